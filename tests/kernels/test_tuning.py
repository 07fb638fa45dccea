"""Where launch configurations come from: shipped table, user cache, BITCOMPILE_RETUNE."""
import json

from bitcompile.kernels import tuning


def test_lookup_order_and_retune(tmp_path, monkeypatch):
    shipped, user = tmp_path / "shipped", tmp_path / "user"
    shipped.mkdir()
    (shipped / "gpu.json").write_text(json.dumps({"ternary_mm:1,8,8": {"BN": 4}, "grad_input:1,8,8": {"BM": 16},
                                                  "weight_pack:8,8": {"BN": 2}}))
    (user / "autotune").mkdir(parents=True)
    (user / "autotune" / "gpu.json").write_text(json.dumps({"weight_pack:8,8": {"BN": 8}}))
    monkeypatch.setattr(tuning, "SHIPPED_DIR", shipped)
    monkeypatch.setenv("BITCOMPILE_CACHE_DIR", str(user))
    monkeypatch.setattr(tuning, "_memory", {})
    assert tuning._load("gpu") == {"ternary_mm:1,8,8": {"BN": 4}, "grad_input:1,8,8": {"BM": 16},
                                   "weight_pack:8,8": {"BN": 8}}  # the user's entry wins
    monkeypatch.setattr(tuning, "_memory", {})
    monkeypatch.setenv("BITCOMPILE_RETUNE", "ternary_mm, grad_input")
    assert tuning._load("gpu") == {"weight_pack:8,8": {"BN": 8}}  # shipped matmul entries dropped
    monkeypatch.setattr(tuning, "_memory", {})
    monkeypatch.setenv("BITCOMPILE_RETUNE", "all")
    assert tuning._load("gpu") == {"weight_pack:8,8": {"BN": 8}}
