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
