"""Template captions and descriptions: text priors with nothing downloaded.

Captions come from dataset labels (UTKFace file names give age, gender and race):
"a photo of the face of a 34-year-old white woman"; without labels, "a photo of a face".
Descriptions add the head pose read from the 5 landmarks. These are heuristics, measured in the
face frame of :func:`landmark_mask.face_frame` (thresholds chosen on the FFHQ template, where they
read 0 degrees, 0.0 and 0.56):

- tilt: angle of the eye line; beyond 8 degrees the head is "tilted" (towards the picture's side
  whose eye is lower).
- turn: horizontal offset of the nose tip from the eye midpoint, in inter-ocular distances; the
  nose tip moves towards the side the face is turned to (0.12: slightly, 0.25: clearly).
- pitch: the nose tip's share of the eye-to-mouth distance; a raised chin brings it up towards the
  eyes (< 0.45), a lowered head down towards the mouth (> 0.68).
- mouth: mouth-corner distance over inter-ocular distance; a wide mouth (> 1.0) usually smiles.
  Only used when the mouth corners were observed (RetinaFace/YuNet or given landmarks): dlib's
  corners are estimated from the nose base and measured 0.82-0.91 on all 10 FFHQ dev faces,
  broad smiles included.

Five points cannot tell an open mouth from a closed one or see the eyes' state, so the
descriptions do not claim either.
"""

from __future__ import annotations

import math

import torch

from .landmark_mask import face_frame

CAPTION_EXTRACTOR_ID = "template-caption-v1"
DESCRIPTION_EXTRACTOR_ID = "template-description-v1"
NO_LABEL_CAPTION = "a photo of a face"
_TILT_DEG = 8.0
_TURN = (0.12, 0.25)
_PITCH = (0.45, 0.68)
_WIDE_MOUTH = 1.0
_RACE_WORDS = {"asian": "Asian", "indian": "Indian"}  # proper adjectives; UTKFace labels are lower case
DESCRIPTION_SETTINGS = {
    "tilt_deg": _TILT_DEG,
    "turn": list(_TURN),
    "pitch": list(_PITCH),
    "wide_mouth": _WIDE_MOUTH,
}


def _person(labels: dict | None) -> str | None:
    """'34-year-old white woman' from labels with any of age, gender, race; None when empty."""
    if not labels:
        return None
    age, gender, race = labels.get("age"), labels.get("gender"), labels.get("race")
    child = age is not None and int(age) < 13
    noun = {"male": "boy" if child else "man", "female": "girl" if child else "woman"}.get(gender, "person")
    words = []
    if age is not None:
        words.append(f"{int(age)}-year-old")
    if race and race != "other":
        words.append(_RACE_WORDS.get(race, str(race)))
    if not words and noun == "person":
        return None
    return " ".join([*words, noun])


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiouAEIOU8" or phrase.startswith(("11-", "18-")) else "a"


def template_caption(labels: dict | None = None) -> str:
    """Caption from labels {age, gender, race} (any subset); 'a photo of a face' without them."""
    person = _person(labels)
    return f"a photo of the face of {_article(person)} {person}" if person else NO_LABEL_CAPTION


def face_geometry(landmarks: torch.Tensor) -> list[dict[str, float]]:
    """Per face: tilt (degrees, + = clockwise in the picture), turn, pitch and mouth-width ratios."""
    f = face_frame(landmarks)
    lm = torch.as_tensor(landmarks, dtype=torch.float32).reshape(-1, 5, 2)
    tilt = torch.rad2deg(torch.atan2(f["u"][:, 1], f["u"][:, 0]))
    rel = lm[:, 2] - f["eye_mid"]
    turn = (rel * f["u"]).sum(1) / f["iod"]
    pitch = (rel * f["d"]).sum(1) / f["em"]
    mouth = f["mouth_width"] / f["iod"]
    return [
        {"tilt_deg": float(t), "turn": float(n), "pitch": float(p), "mouth_ratio": float(m)}
        for t, n, p, m in zip(tilt, turn, pitch, mouth, strict=True)
    ]


def _pose_phrases(g: dict[str, float], mouth_observed: bool) -> list[str]:
    phrases = []
    turn = g["turn"]
    if abs(turn) >= _TURN[0]:
        side = "right" if turn > 0 else "left"
        amount = "clearly" if abs(turn) >= _TURN[1] else "slightly"
        phrases.append(f"turned {amount} towards the {side} of the picture")
    else:
        phrases.append("seen from the front")
    if abs(g["tilt_deg"]) >= _TILT_DEG and math.isfinite(g["tilt_deg"]):
        # Clockwise rotation in the picture lowers the picture-right eye: the head leans right.
        phrases.append(f"head tilted towards the {'right' if g['tilt_deg'] > 0 else 'left'}")
    if g["pitch"] < _PITCH[0]:
        phrases.append("chin raised")
    elif g["pitch"] > _PITCH[1]:
        phrases.append("head lowered")
    if mouth_observed:
        phrases.append(
            "with a wide mouth, probably smiling"
            if g["mouth_ratio"] > _WIDE_MOUTH
            else "with a relaxed mouth"
        )
    return phrases


def template_description(
    landmarks: torch.Tensor | None, labels_list: list[dict | None], mouth_observed: bool = True
) -> list[str]:
    """One sentence per face: who (labels) and head pose / mouth width (landmarks, heuristics)."""
    geometry = face_geometry(landmarks) if landmarks is not None else [None] * len(labels_list)
    if len(geometry) != len(labels_list):
        raise ValueError(f"{len(geometry)} landmark set(s) for {len(labels_list)} label set(s)")
    out = []
    for g, labels in zip(geometry, labels_list, strict=True):
        text = template_caption(labels)
        text = text[0].upper() + text[1:]
        if g is not None:
            text += ", " + ", ".join(_pose_phrases(g, mouth_observed))
        out.append(text + ".")
    return out
