"""vLLM 0.26 attention-backend glue for Kakeya KV (issue 4: not implemented yet; see NOTES.md)."""
