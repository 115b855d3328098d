"""Prior extraction: captions, descriptions, masks, depth, text embeddings; the prior bundle and cache."""
