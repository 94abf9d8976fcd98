"""Which decoder-only causal-LM families distzo trains, and the check that keeps it honest.

distzo runs each family's own ``transformers`` code (see ``modeling.py``), so what a family
needs is what ``transformers`` says about it: a causal-LM class in its causal-LM mapping,
and a forward that can be streamed block by block. Refused up front, by name, with the reason:

* encoder families (listed for masked LM: BERT, RoBERTa, ...) and the decoder halves of
  encoder-decoder families (BART, Marian, ...): not decoder-only;
* multimodal models (``...ForConditionalGeneration``) and the families in ``UNSUPPORTED``.

(The refusal and ``UNSUPPORTED`` sit in ``modeldir.py``, under the forward, so that reading a model
directory refuses a family without building anything; they are re-exported here.) ``load_config`` and
``load_model`` are how a job's model directory is loaded: refused, or checked numerically when untested.

``TESTED_FAMILIES`` is what ``tests/test_families.py`` checks on a tiny random model of each
family: the block-streaming forward equals transformers' forward (logits and loss, clean and
perturbed). A family outside it is checked the same way when a model directory is loaded
(``verify_untested``), on a small random model built from the model's own config, and is
refused when the two forwards differ: a block forward that is not the family's own never trains.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from distzo.data.tasks import IGNORE, Batch
from distzo.model.adapters import LoraTarget, checkpoint_name, is_adapter
from distzo.model.blockfeed import MemoryFeed
from distzo.model.blocks import flatten_block
from distzo.model.forward import ForwardEngine, ForwardJob
from distzo.model.modeldir import UNSUPPORTED, ModelError, read_config, refusal  # noqa: F401 - the refusals, by family
from distzo.model.modeling import BlockModel
from distzo.model.prefix import PrefixTarget
from distzo.zo.forwardweights import perturb_block
from distzo.zo.generator import Distribution

# families whose tiny random model passes tests/test_families.py (README, "Model families")
TESTED_FAMILIES: tuple[str, ...] = (
    "afmoe", "apertus", "apertus1p5_text", "arcee", "aria_text", "axk2", "beam", "biogpt", "bitnet", "bloom",
    "codegen", "cohere", "cohere2", "cohere2_moe", "ctrl", "deepseek_v32", "deepseek_v4", "diffllama", "doge",
    "ergo", "ernie4_5", "ernie4_5_moe", "exaone", "exaone4", "exaone_moe", "falcon", "falcon_mamba", "flex_olmo",
    "flint", "gemma", "gemma2", "gemma3_text", "glm", "glm4", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "gpt-sw3",
    "gpt2", "gpt_bigcode", "gpt_neo", "gpt_neox", "gpt_neox_japanese", "gpt_oss", "gptj", "granite", "granite_swa",
    "granitemoe", "granitemoe_swa", "granitemoeshared", "helium", "hy_v3", "hy_v4", "hyperclovax",
    "inkling2_loop_text", "inkling2_text", "inkling_text", "internlm3", "iquestcoder", "jais2", "jetmoe",
    "kolibri1", "laguna", "lara_mini", "lfm2", "llama", "longcat_flash", "mamba", "mellum", "mimo_v2_flash",
    "minicpm3", "minicpm5_moe", "minimax", "minimax_m2", "minimax_m3_vl_text", "ministral3", "mistral", "mixtral",
    "moshi", "mpt", "nanochat", "olmo", "olmo2", "olmo3", "olmoe", "openai-gpt", "opt", "param2moe", "persimmon",
    "phi", "phi3", "phimoe", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "sarvam_mla", "sarvam_moe", "seed_oss",
    "smollm3", "solar_open", "stablelm", "starcoder2", "vaultgemma", "xglm", "youtu",
)

# the sizes of a tiny model; a key is set only where the family's config has it
TINY_SIZES: dict[str, Any] = dict(
    hidden_size=32, n_embd=32, d_model=32, word_embed_proj_dim=32, num_hidden_layers=2, n_layer=2, num_layers=2,
    num_attention_heads=4, n_head=4, num_heads=4, num_key_value_heads=2, head_dim=8,
    intermediate_size=64, ffn_dim=64, n_inner=64, ffn_hidden_size=64,
    max_position_embeddings=128, n_positions=128, n_ctx=128,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
    n_shared_experts=1, shared_expert_intermediate_size=32, moe_num_experts=4, moe_topk=2, moe_k=2,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, qk_head_dim=16,
    first_k_dense_replace=1, rotary_dim=4,
)
TINY_VOCAB = 512


def tiny_config(config: PretrainedConfig, vocab_size: int = TINY_VOCAB) -> PretrainedConfig:
    """The same family and options (soft-capping, scaling, tying, ...) at toy sizes: 2 layers, width 32.

    Per-layer lists (``layer_types``) are cut to the new depth. Raises what transformers raises
    for a config it cannot build.
    """
    raw = config.to_dict()
    layers = int(config.num_hidden_layers)
    for key in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        raw.pop(key, None)
    heads, kv_heads = raw.get("num_attention_heads"), raw.get("num_key_value_heads")
    for key, value in TINY_SIZES.items():
        if key in raw and raw[key] is not None:
            raw[key] = value
    if kv_heads is not None and kv_heads == heads:  # no grouped-query attention: keep it that way
        raw["num_key_value_heads"] = raw["num_attention_heads"]
    for key, value in list(raw.items()):
        if isinstance(value, list) and len(value) == layers and key not in TINY_SIZES:
            raw[key] = value[: TINY_SIZES["num_hidden_layers"]]
    raw["vocab_size"] = vocab_size
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(raw.get(key), int) and raw[key] >= vocab_size:
            raw[key] = None
    return type(config).from_dict(raw)


@dataclass(frozen=True)
class FamilyCheck:
    """Largest differences between the block forward and transformers' forward (fp32)."""

    model_type: str
    logits_diff: float  # max |a - b| over the real positions, clean and perturbed
    loss_rel_diff: float  # max relative difference of the label loss, clean and perturbed
    parameters: int
    causal: bool  # changing a row's last token leaves the logits before it unchanged

    @property
    def ok(self) -> bool:
        return self.causal and self.logits_diff <= 1e-4 and self.loss_rel_diff <= 1e-5

    def problem(self) -> str | None:
        if not self.causal:
            return "its attention is not causal (a position's logits change with a later token)"
        if not self.ok:
            return (f"the block-streaming forward differs from transformers' forward (logits by {self.logits_diff:.3g}, "
                    f"loss by {self.loss_rel_diff:.3g} relative)")
        return None


def _probe_batch(vocab: int, seed: int):  # noqa: ANN202
    """Three right-padded rows of different lengths, the last two real tokens of each labelled."""
    g = torch.Generator().manual_seed(seed)
    lengths = (12, 9, 6)
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, :n] = 1
        labels[i, n - 2 : n] = ids[i, n - 2 : n]
    return Batch(ids, mask, labels)


def compare_with_transformers(config: PretrainedConfig, seed: int = 0, eps: float = 1e-2) -> FamilyCheck:
    """Build a random model of ``config`` and compare the block-streaming forward with transformers'.

    Both run on the same fp32 weights: the clean ones and ``theta + eps * z(seed)`` (Rademacher z),
    on three padded rows; logits are compared at every real position and the loss on the labels
    (the training path: logits only where a label is predicted). Raises ModelError when distzo
    refuses the family, and what transformers raises when it cannot build or run the config.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(config).float().eval()
    bm = BlockModel(config)
    state = hf.state_dict()
    clean = [flatten_block(spec, state) for spec in bm.manifest.blocks]
    perturbed = [perturb_block(buf, spec.global_offset, seed + 1, Distribution.RADEMACHER, [eps], torch.float32)[0]
                 for spec, buf in zip(bm.manifest.blocks, clean)]
    batch = _probe_batch(hf.get_input_embeddings().weight.shape[0], seed)
    engine = ForwardEngine(bm, Distribution.RADEMACHER)
    jobs = [ForwardJob(batch, want_logits=True), ForwardJob(batch),
            ForwardJob(batch, seed=seed + 1, coef=eps, want_logits=True), ForwardJob(batch, seed=seed + 1, coef=eps)]
    ours = engine.run(jobs, MemoryFeed(clean))
    real = batch.attention_mask.bool()
    logits_diff, loss_diff = 0.0, 0.0
    for weights, (with_logits, loss_only) in ((clean, ours[:2]), (perturbed, ours[2:])):
        hf.load_state_dict(bm.state_dict_from_blocks(weights), strict=False)
        hf.tie_weights()
        with torch.no_grad():
            out = hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        want = float(out.loss)
        logits_diff = max(logits_diff, float((with_logits.logits[real] - out.logits.float()[real]).abs().max()))
        for got in (with_logits.loss, loss_only.loss):
            loss_diff = max(loss_diff, abs(got - want) / max(abs(want), 1e-12))
    changed = batch.input_ids.clone()
    changed[0, 11] = 3 + (int(changed[0, 11]) - 2) % (hf.get_input_embeddings().weight.shape[0] - 3)
    with torch.no_grad():
        a = hf(input_ids=batch.input_ids[:1], attention_mask=batch.attention_mask[:1]).logits[0, :11]
        b = hf(input_ids=changed[:1], attention_mask=batch.attention_mask[:1]).logits[0, :11]
    causal = bool(torch.allclose(a, b, rtol=0, atol=1e-6))
    return FamilyCheck(config.model_type, logits_diff, loss_diff, sum(b.numel() for b in clean), causal)


def compare_prefix_with_peft(config: PretrainedConfig, tokens: int = 3, seed: int = 0) -> float:
    """The largest logit difference between the block engine with a prefix (``train.target prefix``) and
    peft's prefix-tuning model, on a random model of ``config`` and a random prefix, at every real position
    of three padded rows (0.0: bit for bit). Raises ModelError when distzo refuses a prefix for the family."""
    import warnings

    from peft import get_peft_model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hf = AutoModelForCausalLM.from_config(config).float().eval()
    target = PrefixTarget(tokens, seed)
    bm = BlockModel(config, adapter=target)
    state = hf.state_dict()
    tensors = {t.name: target.initial_value(t.name, t.shape) if is_adapter(t.name) else state[checkpoint_name(t.name)]
               for b in bm.manifest.blocks for t in b.tensors}
    clean = [flatten_block(spec, tensors) for spec in bm.manifest.blocks]
    batch = _probe_batch(hf.get_input_embeddings().weight.shape[0], seed)
    ours = ForwardEngine(bm).run([ForwardJob(batch, want_logits=True)], MemoryFeed(clean))[0].logits
    with warnings.catch_warnings():  # peft passes past_key_values, deprecated in transformers 5.2x
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(hf, target.peft_config(hf.config), adapter_name="default").eval()
        target.load_into(peft_model, {k: v for k, v in bm.state_dict_from_blocks(clean).items() if is_adapter(k)},
                         bm.layers_path)
        with torch.no_grad():
            theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    real = batch.attention_mask.bool()
    return float((ours[real] - theirs.float()[real]).abs().max())


@functools.lru_cache(maxsize=16)
def _verified(config_json: str, config_class: type) -> str | None:
    config = config_class.from_dict(json.loads(config_json))
    try:
        check = compare_with_transformers(tiny_config(config))
    except Exception as exc:  # noqa: BLE001 - what transformers raises for configs it cannot build or run
        return f"a small random model of this config cannot be built or run to check it: {type(exc).__name__}: {exc}"
    problem = check.problem()
    return None if problem is None else f"on a small random model of this config, {problem}"


def verify_untested(config: PretrainedConfig, where: str) -> None:
    """For a family outside TESTED_FAMILIES: refuse it (ModelError) unless the block forward is transformers'."""
    if config.model_type in TESTED_FAMILIES:
        return
    reason = _verified(config.to_json_string(use_diff=False), type(config))
    if reason is not None:
        raise ModelError(f"{where!r} holds a {config.model_type!r} model, a family distzo has not tested, and {reason}")


def load_config(model_dir: str | Path, verify: bool = True) -> PretrainedConfig:
    """The model directory's config (``modeldir.read_config``: refused unless a decoder-only causal LM of a family
    distzo can train) and, with ``verify``, for a family outside ``TESTED_FAMILIES``, the numeric check on a small
    random model of the same config (``verify_untested``). What a job's inputs and every service load through."""
    config = read_config(model_dir)
    if verify:
        verify_untested(config, where=str(Path(model_dir)))
    return config


def load_model(model_dir: str | Path, adapter: LoraTarget | PrefixTarget | None = None) -> BlockModel:
    """``BlockModel.from_dir`` of a checked model directory (``load_config``: refused, or checked numerically
    when its family is untested): the skeleton the parameter server and the reference build their blocks on."""
    return BlockModel(load_config(model_dir), Path(model_dir), adapter)
