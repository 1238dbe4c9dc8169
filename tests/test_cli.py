import json

import click
import pytest
import torch
from click.testing import CliRunner

from quantkit import __version__
from quantkit.checkpoint import load_checkpoint
from quantkit.cli import main
from quantkit.model import load_model


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_version():
    assert __version__ in run("--version").output


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_option_of_every_command_is_documented():
    for path, cmd in _commands(main):
        text = run(*path, "--help").output
        for param in cmd.params:
            if isinstance(param, click.Option):
                assert param.help, f"{' '.join(path)} {param.opts} has no help"
                assert param.opts[-1] in text


def test_ptq_end_to_end_then_eval_json(tiny_dir, tmp_path, data_dir, ids):
    out = tmp_path / "ptq"
    run("ptq", "--model", tiny_dir, "--output", out)
    loaded, meta = load_checkpoint(out)
    assert meta["pipeline"] == "ptq" and meta["config"]["scheme"]["group_size"] == 32
    float_model = load_model(str(tiny_dir)).model
    assert meta["source"]["sha256"] == load_model(str(tiny_dir)).source_sha256
    with torch.inference_mode():
        q, f = loaded.model(ids).logits, float_model(ids).logits
    assert not torch.equal(q, f)  # quantized ...
    cos = torch.nn.functional.cosine_similarity(q.float().flatten(), f.float().flatten(), dim=0)
    assert cos > 0.9, cos  # ... but still close to the float model (unrelated logits give ~0)

    js = tmp_path / "ppl.json"
    res = run("eval", tiny_dir, out, "--seq-len", 64, "--max-windows", 2, "--data-dir", data_dir, "--json", js)
    assert "perplexity" in res.output
    rows = json.loads(js.read_text())["wikitext2_perplexity"]
    assert [r["kind"] for r in rows] == ["bf16", "ptq (rtn)"] and all(r["windows"] == 2 for r in rows)
    assert all(len(r["window_nll"]) == 2 for r in rows)
    # --no-cache scores the windows again, to the same floats
    again = tmp_path / "again.json"
    run("eval", out, "--seq-len", 64, "--max-windows", 2, "--data-dir", data_dir, "--json", again, "--no-cache")
    assert json.loads(again.read_text())["wikitext2_perplexity"][0] == rows[1]


def test_output_exists_is_refused_and_untouched(tiny_dir, tmp_path):
    out = tmp_path / "ptq"
    out.mkdir()
    res = run("ptq", "--model", tiny_dir, "--output", out, ok=False)
    assert res.exit_code != 0 and "--overwrite" in res.output
    assert list(out.iterdir()) == []
    run("ptq", "--model", tiny_dir, "--output", out, "--overwrite")
    assert (out / "quantkit.json").is_file()


@pytest.mark.parametrize("args,needle", [
    (("ptq", "--output", "{tmp}/o", "--group-size", "0"), "--group-size"),
    (("ptq", "--output", "{tmp}/o", "--group-size", "7"), "group_size"),
    (("eval", "{model}", "--max-windows", "-3"), "--max-windows"),
    (("eval", "{model}", "--seq-len", "1"), "--seq-len"),
    (("eval", "{model}", "--data-dir", "{tmp}/nowhere"), "does not exist"),
    (("eval", "{tmp}/missing-model"), "does not exist"),
    (("ptq", "--model", "{tmp}", "--output", "{tmp}/o"), "not a Hugging Face model directory"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(args, needle, tiny_dir, tmp_path):
    args = [a.format(tmp=tmp_path, model=tiny_dir) for a in args]
    before = sorted(p.name for p in tmp_path.iterdir())
    res = run(*args, ok=False)
    assert res.exit_code != 0 and needle in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_data_dir_without_expected_files(tiny_dir, tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    res = run("eval", tiny_dir, "--data-dir", empty, "--seq-len", 64, ok=False)
    assert res.exit_code != 0 and "has no wikitext-2-raw-v1/test.jsonl" in res.output


def test_generate_is_greedy_decoding_of_the_model(tiny_dir):
    res = run("generate", tiny_dir, "--prompt", "hello", "--max-new-tokens", 6)
    loaded = load_model(str(tiny_dir))
    eos = loaded.tokenizer.eos_token_id
    ids = loaded.tokenizer("hello", return_tensors="pt")["input_ids"]
    new = []
    with torch.inference_mode():
        while len(new) < 6 and (not new or new[-1] != eos):  # the greedy loop, spelled out
            new.append(int(loaded.model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[new[-1]]])], dim=1)
    expected = loaded.tokenizer.decode(new, skip_special_tokens=True)
    assert res.stdout.rstrip("\n") == expected
    assert "tokens/s" in res.stderr


def test_bench_model_json_has_the_summary_keys(tmp_path):
    js = tmp_path / "bench.json"
    run("bench", "model", "--synthetic", "tiny", "--new-tokens", 3, "--prefill-tokens", 16, "--repeats", 1,
        "--json", js)
    result = json.loads(js.read_text())
    s = result["summary"]
    for key in ("decode_tok_s", "prefill_tok_s", "ttft_s", "size_mib", "peak_rss_mib",
                "decode_speedup", "prefill_speedup", "size_ratio", "rss_ratio"):
        assert s[key] > 0, key
    assert result["model"] == "synthetic:tiny:8da4w" and result["baseline"]["model"] == "synthetic:tiny"
    assert s["size_ratio"] < 0.6  # int4 blocks + int8 head and embedding vs bf16 (tied, stored once)


def test_bench_peak_rss_is_the_benchmark_alone_not_its_parent():
    from quantkit.bench_model import ModelBenchConfig, bench_model

    ballast = torch.ones(600 * 2**20, dtype=torch.uint8)  # the parent holds 600 MiB when it starts the child
    result = bench_model("synthetic:tiny", ModelBenchConfig(new_tokens=2, prefill_tokens=8, repeats=1))
    assert ballast.sum() > 0
    assert result["summary"]["peak_rss_mib"] < 550  # a tiny model in a fresh interpreter
