"""jobs.export: checkpoint -> Hugging Face directory -> transformers (same logits) and back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # transformers must never reach the network
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from jobs.config import ConfigError, load_config
from jobs.checkpoint.layout import write_rank_manifest
from jobs.checkpoint.load import load_into, load_state_dict, load_tokenizer_of
from jobs.export import ExportConfig, cli, run as export
from model.config import ARCH_FIELDS, same_architecture
from model.hf import from_hf_state, to_hf
from model import GPT, ModelConfig
from model.tokenizer import EOT, tokenizer_sha256, train_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXT = ["First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20,
        "All:\nSpeak, speak. Résumé naïve — café ☕ 日本語\n" * 20]

LLAMA_TIED = dict(arch="llama", n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, d_ff=64, max_seq_len=64,
                  rope_theta=500.0, norm_eps=1e-6, tie_embeddings=True)
LLAMA_UNTIED = {**LLAMA_TIED, "n_kv_heads": 1, "tie_embeddings": False}
GPT2_TIED = dict(arch="gpt2", n_layers=2, n_heads=4, d_model=32, max_seq_len=64, tie_embeddings=True)
GPT2_UNTIED = {**GPT2_TIED, "d_ff": 48, "tie_embeddings": False}


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXT, vocab_size=300, min_frequency=1)


def make_model(tok, seed: int = 0, **arch) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), **arch)).eval()
    with torch.no_grad():  # norms start at ones/zeros; random values catch a mis-mapped norm
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def write_checkpoint(run_dir: Path, model: GPT, tok, step: int) -> Path:
    """A checkpoint directory in exactly the layout jobs.pretrain writes."""
    ck = run_dir / f"checkpoint_{step:07d}"
    ck.mkdir(parents=True)
    sd = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight")
    save_file(sd, str(ck / "model.safetensors"))
    (ck / "train_state.json").write_text(json.dumps({
        "step": step, "data_cursor": 0, "world_size": 1, "config": {}, "model": model.cfg.model_dump(mode="json"),
        "tokenizer_sha256": tokenizer_sha256(tok), "data_manifest_sha256": "0" * 64}))
    (ck / "tokenizer.json").write_text(tok.to_str())
    write_rank_manifest(ck, rank=0, step=step, world=1)
    return ck


def ids(model: GPT, n: int = 24) -> torch.Tensor:
    return torch.randint(0, model.cfg.vocab_size, (2, n), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def ours(model: GPT, x: torch.Tensor) -> torch.Tensor:
    return model(x)


@torch.no_grad()
def theirs(path: Path, x: torch.Tensor, **kw) -> tuple[torch.Tensor, object]:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    return hf(x).logits, hf


@pytest.mark.parametrize("arch", [LLAMA_TIED, LLAMA_UNTIED, GPT2_TIED, GPT2_UNTIED],
                         ids=["llama-gqa-tied", "llama-mqa-untied", "gpt2-tied", "gpt2-untied"])
def test_export_gives_same_logits_in_transformers(tmp_path, tok, arch):
    model = make_model(tok, **arch)
    ck = write_checkpoint(tmp_path / "run", model, tok, step=7)
    write_checkpoint(tmp_path / "run", make_model(tok, seed=1, **arch), tok, step=3)  # older: not picked
    out = tmp_path / "hf"
    summary = export(ExportConfig(run=str(tmp_path / "run"), output=str(out)))
    assert summary["step"] == 7 and summary["checkpoint"] == str(ck)

    x = ids(model)
    logits, hf = theirs(out, x)
    want = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[arch["arch"]]
    assert type(hf).__name__ == want and hf.dtype == torch.float32
    assert (logits - ours(model, x)).abs().max().item() <= 1e-4

    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [want] and config["tie_word_embeddings"] == arch["tie_embeddings"]
    assert config["eos_token_id"] == tok.token_to_id(EOT)
    weights = load_file(str(out / "model.safetensors"))
    assert ("lm_head.weight" in weights) != arch["tie_embeddings"]  # tied: the embedding is written once
    info = json.loads((out / "raylm_export.json").read_text())
    assert info["source_checkpoint"] == str(ck) and info["step"] == 7 and info["export_config"]["dtype"] == "fp32"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.token_to_id(EOT) and gen["pad_token_id"] == tok.token_to_id("<|pad|>")


def test_bf16_export_loads_and_matches_its_own_weights(tmp_path, tok):
    model = make_model(tok, **LLAMA_TIED)
    ck = write_checkpoint(tmp_path / "run", model, tok, step=5)
    out = tmp_path / "hf-bf16"
    export(ExportConfig(checkpoint=str(ck), output=str(out), dtype="bf16"))
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (out / "model.safetensors").stat().st_size < 0.6 * (ck / "model.safetensors").stat().st_size

    x = ids(model)
    logits_bf16, hf = theirs(out, x)
    assert hf.dtype == torch.bfloat16 and torch.isfinite(logits_bf16).all()
    # Upcast, the transformers model and ours run the same bf16-rounded weights.
    logits32, _ = theirs(out, x, dtype=torch.float32)
    mcfg, sd = load_state_dict(out)
    rounded = load_into(GPT(mcfg).eval(), sd)
    assert (logits32 - ours(rounded, x)).abs().max().item() <= 1e-4
    assert 0 < (ours(rounded, x) - ours(model, x)).abs().max().item() < 0.05  # rounded, but only just


@pytest.mark.parametrize("arch", [LLAMA_TIED, LLAMA_UNTIED, GPT2_TIED, GPT2_UNTIED],
                         ids=["llama-gqa-tied", "llama-mqa-untied", "gpt2-tied", "gpt2-untied"])
def test_round_trip_reproduces_logits_exactly(tmp_path, tok, arch):
    model = make_model(tok, **arch)
    hf_sd, hf_config = to_hf(model.state_dict(), model.cfg)
    mcfg, sd = from_hf_state(hf_sd, hf_config)
    for field in ARCH_FIELDS:
        assert getattr(mcfg, field) == getattr(model.cfg, field), field
    assert same_architecture(mcfg, model.cfg)
    assert not same_architecture(mcfg, model.cfg.model_copy(update={"norm_eps": 1e-3}))
    x = ids(model)
    assert torch.equal(ours(load_into(GPT(mcfg).eval(), sd), x), ours(model, x))

    # The same through files: export, then from_hf on the directory.
    ck = write_checkpoint(tmp_path / "run", model, tok, step=1)
    export(ExportConfig(checkpoint=str(ck), output=str(tmp_path / "hf")))
    mcfg, sd = load_state_dict(tmp_path / "hf")
    assert mcfg == model.cfg  # exactly the checkpoint's config, from raylm_export.json
    assert torch.equal(ours(load_into(GPT(mcfg).eval(), sd), x), ours(model, x))
    # Without our metadata (any HF directory) the config is rebuilt from config.json alone.
    (tmp_path / "hf" / "raylm_export.json").unlink()
    mcfg, sd = load_state_dict(tmp_path / "hf")
    assert same_architecture(mcfg, model.cfg)
    assert torch.equal(ours(load_into(GPT(mcfg).eval(), sd), x), ours(model, x))


def test_tokenizer_loads_in_transformers_and_encodes_identically(tmp_path, tok):
    ck = write_checkpoint(tmp_path / "run", make_model(tok, **GPT2_TIED), tok, step=1)
    out = tmp_path / "hf"
    export(ExportConfig(checkpoint=str(ck), output=str(out)))
    auto = transformers.AutoTokenizer.from_pretrained(out)
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    texts = ["First Citizen:\nBefore we proceed", "  leading spaces\tand tabs", "café ☕ 日本語 🙂",
             f"one{EOT}two<|user|>hi<|end|>", ""]
    for t in texts:
        want = tok.encode(t, add_special_tokens=False).ids
        assert auto(t)["input_ids"] == want and fast(t)["input_ids"] == want, t
        assert auto.decode(want) == t
    assert auto.eos_token == EOT and auto.eos_token_id == tok.token_to_id(EOT)
    assert auto.pad_token_id == tok.token_to_id("<|pad|>")
    assert load_tokenizer_of(out).to_str() == tok.to_str()


def test_gpt2_with_grouped_query_attention_is_rejected(tmp_path, tok):
    model = make_model(tok, **{**GPT2_TIED, "n_kv_heads": 2})
    with pytest.raises(ValueError, match="model.n_kv_heads"):
        to_hf(model.state_dict(), model.cfg)
    ck = write_checkpoint(tmp_path / "run", model, tok, step=1)
    with pytest.raises(ValueError, match="n_kv_heads"):
        export(ExportConfig(checkpoint=str(ck), output=str(tmp_path / "hf")))
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_load_pretrained_reads_checkpoints_runs_and_exports(tmp_path, tok):
    model = make_model(tok, **LLAMA_UNTIED)
    ck = write_checkpoint(tmp_path / "run", model, tok, step=4)
    export(ExportConfig(checkpoint=str(ck), output=str(tmp_path / "hf")))
    x = ids(model)
    for path in (ck, tmp_path / "run", tmp_path / "hf"):
        mcfg, sd = load_state_dict(str(path))
        assert mcfg.arch == "llama" and mcfg.kv_heads == 1 and not mcfg.tie_embeddings
        assert {v.dtype for v in sd.values()} == {torch.float32}
        assert torch.equal(ours(load_into(GPT(mcfg).eval(), sd), x), ours(model, x)), path
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        load_state_dict(tmp_path / "nowhere")
    mcfg, sd = load_state_dict(ck)
    sd.pop("blocks.0.attn.wq.weight")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.wq\.weight"):
        load_into(GPT(mcfg), sd, "ck")
    # our exports carry each file's sha256: a flipped byte is refused, naming the file
    info = json.loads((tmp_path / "hf" / "raylm_export.json").read_text())
    assert set(info["files"]) >= {"model.safetensors", "config.json", "tokenizer.json"}
    data = bytearray((tmp_path / "hf" / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / "hf" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch in model.safetensors"):
        load_state_dict(str(tmp_path / "hf"))


def test_from_hf_reads_directories_written_by_transformers(tmp_path):
    """Third-party layouts: a LlamaForCausalLM save_pretrained, and the original GPT-2 file layout
    (no `transformer.` prefix, causal-mask buffers stored as weights)."""
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, rope_theta=300.0, tie_word_embeddings=False)).eval()
    llama.save_pretrained(tmp_path / "llama")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()
    gpt2.config.save_pretrained(tmp_path / "gpt2")
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in gpt2.state_dict().items() if k != "lm_head.weight"}
    for i in range(2):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(sd, str(tmp_path / "gpt2" / "model.safetensors"))

    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    for name, hf in (("llama", llama), ("gpt2", gpt2)):
        mcfg, state = load_state_dict(tmp_path / name)
        with torch.no_grad():
            want = hf(x).logits
        assert (ours(load_into(GPT(mcfg).eval(), state), x) - want).abs().max().item() <= 1e-4, name
    assert load_state_dict(tmp_path / "llama")[0].rope_theta == 300.0


def test_unsupported_hf_configs_are_rejected_by_field(tmp_path, tok):
    hf_sd, hf_config = to_hf(make_model(tok, **LLAMA_TIED).state_dict(), ModelConfig(
        vocab_size=tok.get_vocab_size(), **LLAMA_TIED))
    for change, field in (({"hidden_act": "gelu"}, "hidden_act"),
                          ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
                          ({"model_type": "mistral"}, "model_type"),
                          ({"head_dim": 16}, "head_dim")):
        with pytest.raises(ValueError, match=field):
            from_hf_state(hf_sd, {**hf_config, **change})
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight|layers.1.mlp.up_proj.weight"):
        from_hf_state({k: v for k, v in hf_sd.items() if "layers.1.mlp.up_proj" not in k}, hf_config)


def test_config_needs_exactly_one_source_and_refuses_to_overwrite(tmp_path, tok):
    with pytest.raises(ConfigError, match="exactly one of run"):
        load_config(ExportConfig, overrides={"output": "x"})
    with pytest.raises(ConfigError, match="exactly one of run"):
        load_config(ExportConfig, overrides={"output": "x", "run": "a", "checkpoint": "b"})
    ck = write_checkpoint(tmp_path / "run", make_model(tok, **GPT2_TIED), tok, step=1)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        export(ExportConfig(checkpoint=str(ck), output=str(tmp_path / "hf")))
    export(ExportConfig(checkpoint=str(ck), output=str(tmp_path / "hf"), overwrite=True))
    assert not (tmp_path / "hf" / "keep.txt").exists() and (tmp_path / "hf" / "config.json").is_file()
    with open(ck / "model.safetensors", "r+b") as f:  # a corrupted checkpoint is refused, not exported
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(ValueError, match="corrupt checkpoint: checksum mismatch in model.safetensors"):
        export(ExportConfig(checkpoint=str(ck), output=str(tmp_path / "hf3")))


def test_cli_end_to_end(tmp_path, tok):
    model = make_model(tok, **LLAMA_TIED)
    write_checkpoint(tmp_path / "run", model, tok, step=9)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(f"export:\n  run: {tmp_path / 'run'}\n  output: {tmp_path / 'hf'}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "jobs.export", "--config", str(cfg), "--set", "dtype=bf16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "step 9" in proc.stdout
    info = json.loads((tmp_path / "hf" / "raylm_export.json").read_text())
    assert info["step"] == 9 and info["dtype"] == "bf16"
    x = ids(model)
    logits, _ = theirs(tmp_path / "hf", x, dtype=torch.float32)
    assert (logits - ours(model, x)).abs().max().item() < 0.05  # bf16-rounded weights



def test_cli_flags_pick_the_source_and_bad_values_are_named(tmp_path, tok, capsys):
    model = make_model(tok, **GPT2_UNTIED)
    ck = write_checkpoint(tmp_path / "run", model, tok, step=2)
    cfg = tmp_path / "export.yaml"
    cfg.write_text(f"kind: export\nrun: {tmp_path / 'elsewhere'}\noutput: {tmp_path / 'unused'}\n")
    # --checkpoint replaces the file's run instead of clashing with it.
    summary = cli(["--config", str(cfg), "--checkpoint", str(ck), "--output", str(tmp_path / "hf")])
    assert summary["checkpoint"] == str(ck) and (tmp_path / "hf" / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as exc:
        cli(["--run", str(tmp_path / "run"), "--output", str(tmp_path / "hf2"), "--dtype", "bf16", "--set", "dtype=fp16"])
    assert exc.value.code == 2 and "dtype" in capsys.readouterr().err
