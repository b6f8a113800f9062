"""Language-model stage: the Gemma 3 decoder, its weights, tokenizer, prompt layout and engine."""
