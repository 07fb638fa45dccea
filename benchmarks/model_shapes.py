"""The transformers Llama configurations the model benchmark builds (``bench_models.py``) and
``tune_models.py`` tunes for: no downloads, random weights."""

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
QAT_SIZES = {
    384: dict(
        hidden_size=384, intermediate_size=1024, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=6
    ),
    2048: dict(
        hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4, num_hidden_layers=8
    ),
    4096: dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=4
    ),
}

# Common open models' decoder layers: hidden, intermediate, attention heads, key/value heads (their
# published configs), for tune_models.py.
OPEN_MODELS = {
    "llama2-7b": (4096, 11008, 32, 32),
    "llama3-8b": (4096, 14336, 32, 8),
    "mistral-7b": (4096, 14336, 32, 8),
    "llama3-70b": (8192, 28672, 64, 8),
    "tinyllama-1.1b": (2048, 5632, 32, 4),
    "qwen2.5-0.5b": (896, 4864, 14, 2),
    "qwen2.5-1.5b": (1536, 8960, 12, 2),
    "qwen2.5-3b": (2048, 11008, 16, 2),
    "qwen2.5-7b": (3584, 18944, 28, 4),
}
# Their vocabulary sizes where lm_head has its own weight (an int8 lm_head, deploy(excluded_weights="int8"));
# Qwen2.5 up to 3B ties lm_head to the embedding (it stays float).
OPEN_MODEL_HEADS = {
    "llama2-7b": 32000,
    "llama3-8b": 128256,
    "mistral-7b": 32000,
    "llama3-70b": 128256,
    "tinyllama-1.1b": 32000,
    "qwen2.5-7b": 152064,
}
