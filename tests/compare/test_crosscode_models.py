"""One crosscoder over three models (crosscode.all_models) through the real CLI: every
model's class, the floor with every other model's untrained copy, the ceiling with
rotations of the first, each model's FVU and CE against its own SAE."""

from __future__ import annotations

import json
import math

from helpers import cli, flat, sets, write_corpus


def test_one_crosscoder_of_three_models(tiny_models, tmp_path, env):
    corpus = write_corpus(tmp_path / "docs.jsonl", n=40, titles=True)
    run_dir = tmp_path / "run"
    names = ("llama", "gpt2", "opt")
    models = json.dumps([str(tiny_models[m]) for m in names])
    args = sets(run_dir, tiny_models["llama"], corpus, models=models)
    for command in ("extract", "train"):
        res = cli(command, *args, env=env)
        assert res.returncode == 0, res.stderr
    fast = ("--set", "crosscode.all_models=true", "--set", "crosscode.train_units=20000")
    res = cli("crosscode", *args, *fast, env=env)
    assert res.returncode == 0, res.stderr
    out = run_dir / "compare" / "llama0__gpt20__opt0" / "crosscoder.json"
    record = json.loads(out.read_text())
    assert len(record["models"]) == 3 and "tie_back" not in record
    main = record["roles"]["main"]
    assert main["classes"] == [*(f"{m} only" for m in record["models"]), "shared", "between"]
    assert abs(sum(main["shares"].values()) - 1) < 1e-9 and len(main["fvu"]) == 3
    floor = record["roles"]["floor"]["classes"]
    assert floor[0] == f"{record['models'][0]} only"
    assert floor[1:3] == [f"random:{m} only" for m in record["models"][1:]]
    assert set(record["own_sae_fvu"]) == set(record["ce_loss_recovered"]) == set(record["models"])
    assert all(math.isfinite(v["crosscoder"]) for v in record["ce_loss_recovered"].values())
    for role in ("main", "floor", "ceiling"):
        assert (out.parent / "crosscoder" / role / "crosscoder.safetensors").is_file()
    assert "Crosscoder of" in flat(res.stderr)
