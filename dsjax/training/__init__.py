"""Training the embedded default model: `python -m dsjax.training` (see __main__.py).

corpus.py   ShareGPT English prose -> chat and plain documents -> BPE tokenizer -> packed rows
llama.py    a LLaMA for training, parameters under HF names (saved as LlamaForCausalLM)
"""
