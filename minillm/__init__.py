"""minillm: a readable Llama you can train, fine-tune, quantize and ship."""
