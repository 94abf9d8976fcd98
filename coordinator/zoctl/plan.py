"""``zoctl plan``: the step-time model (distzo.perf.model) for a named model on a named cluster.

Prints every term of a step, the bottleneck, bytes per link, memory per GPU and per
parameter-server host, and the recommended layout, before anyone rents the GPUs. Here: the flags, how
they resolve to a model, cluster, layout and target, and the command; the printed table is ``planreport.py``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from coordinator.zoctl.common import EXIT_BAD_INPUT, CliError, print_json
from coordinator.zoctl.planreport import render, render_peers
from distzo.common.dtypes import ITEMSIZE
from distzo.common.errors import counted
from distzo.perf.clusters import CLUSTERS, ClusterSpec, with_overrides
from distzo.perf.model import Prediction, predict
from distzo.perf.peers import predict_peers
from distzo.perf.recommend import Recommendation, recommend
from distzo.perf.specs import MODELS, LayoutSpec, ModelSpec
from distzo.perf.targets import FULL, TargetSpec, lora_target, prefix_target

DEFAULT_CLUSTER = "h100x8"
DEFAULT_TOKENS = 32768  # 16 sequences of 2048: MeZO's batch of 16
DEFAULT_SEQ = 2048
LORA_MODULES = ("q_proj", "v_proj")  # train.lora_modules null: peft's default for the family; these for most


def register(sub: Any) -> None:
    """Add ``plan`` to zoctl's subcommands (``sub``: the parser's subparsers)."""
    p = sub.add_parser(
        "plan", help="predict step time, bottleneck, bytes and memory of a model on a cluster; recommend a layout",
        description="The step-time model (distzo/perf/model.py): compute, host->GPU, NVLink, network, server update and "
                    "control per step; the floor is the largest, since they overlap. Memory per GPU is a few "
                    "blocks, not the model. On a CPU cluster (cpu-local, cpu-netns) a GPU is a worker process: "
                    "host->worker, intra-node link, worker memory. Without --layout, the recommended layout is shown.")
    p.add_argument("--model", metavar="NAME",
                   help=f"{', '.join(MODELS)}; or a preset or Hugging Face model directory (default: --config's)")
    p.add_argument("--config", metavar="FILE",
                   help="plan this job: its model, tokens per step (batch x max_seq_len), sequence length, served dtype, "
                        "optimizer, target and q; on a CPU cluster also its layout and workers (flags win)")
    p.add_argument("--cluster", default=DEFAULT_CLUSTER, metavar="NAME",
                   help=f"{', '.join(CLUSTERS)} (default {DEFAULT_CLUSTER})")
    p.add_argument("--nodes", type=int, metavar="N", help="override the cluster's node count")
    p.add_argument("--gpus-per-node", type=int, metavar="K", help="override the cluster's GPUs (CPU cluster: worker processes) per node")
    p.add_argument("--gpus-per-worker", type=int, metavar="G",
                   help="GPUs per worker (1: one worker per GPU, as distzo-worker-launch --gpus all runs them)")
    p.add_argument("--fetch-group", type=int, metavar="F", help="workers sharing a sliced fetch (layout.node_size)")
    p.add_argument("--tokens-per-step", type=int, metavar="T",
                   help=f"tokens in one step's batch (default {DEFAULT_TOKENS})")
    p.add_argument("--seq-len", type=int, metavar="S", help=f"sequence length (default min({DEFAULT_SEQ}, T))")
    p.add_argument("--served-dtype", choices=list(ITEMSIZE),
                   help="dtype the parameter server serves (default bfloat16)")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adam"],
                   help="the server's update rule (train.optimizer): its fp32 state is server memory (default sgd)")
    p.add_argument("--target", choices=["full", "lora", "prefix"],
                   help="what is trained (train.target): full, or LoRA adapters or a prefix on a frozen base "
                        "(default full)")
    # defaults are the job config's, read when a plan is made (importing it here would slow every zoctl command)
    p.add_argument("--lora-rank", type=int, metavar="R", help="LoRA rank (train.lora_rank; default the config's)")
    p.add_argument("--lora-modules", metavar="NAMES",
                   help="comma-separated linear modules with adapters (train.lora_modules; default the config's)")
    p.add_argument("--prefix-tokens", type=int, metavar="N",
                   help="prefix length (train.prefix_tokens; default the config's)")
    p.add_argument("--layout", choices=["dual", "pertp", "ddp", "2d"], help="predict this layout (default: the recommended one)")
    p.add_argument("--q", type=int, metavar="Q", help="perturbation directions per step (default 1)")
    p.add_argument("--update-window", type=int, metavar="K",
                   help="server.update_window: materialize K updates per server pass, workers replay the rest "
                        "(default: the recommended one; 1 with momentum or adam)")
    p.add_argument("--peers", action="store_true",
                   help="also predict ZO2 (one GPU) and DistZO2 (one node) on the same model and batch "
                        "(formulas: bench/NOTES.md)")
    p.add_argument("--shards", type=int, metavar="N", help="parameter-server shards (default: the fewest that fit)")
    p.add_argument("--no-replicas", action="store_true", help="no server replica per node: weights cross the network")
    p.add_argument("--eps", type=float, metavar="EPS",
                   help="perturbation scale (train.eps; default the config's): with the model's weights at hand (a "
                        "preset, a fetched model, a model directory), the plan says what the forwards keep of the "
                        "perturbation (distzo/train/precision.py)")
    p.add_argument("--json", action="store_true", help="print the same as JSON (seconds, bytes)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=cmd_plan)


def _train_default(name: str) -> Any:
    from distzo.common.configsections import TrainSection

    field = TrainSection.model_fields[name]
    return field.default_factory() if field.default_factory is not None else field.default


def resolve_target(args: argparse.Namespace, model: ModelSpec) -> TargetSpec:
    """The trained target of the plan: full, LoRA of --lora-rank on --lora-modules, or a prefix of
    --prefix-tokens (ValueError if bad)."""
    if getattr(args, "target", "full") == "full":
        return FULL
    if args.target == "prefix":
        return prefix_target(model, _or_default(args.prefix_tokens, "prefix_tokens"))
    names = args.lora_modules if args.lora_modules is not None else ",".join(_train_default("lora_modules") or LORA_MODULES)
    modules = [m.strip() for m in names.split(",") if m.strip()]
    return lora_target(model, _or_default(args.lora_rank, "lora_rank"), modules)


def _or_default(value: Any, name: str) -> Any:
    return value if value is not None else _train_default(name)


def bad_input(message: str) -> Exception:
    """The exception for bad input: zoctl prints it and exits 2."""
    return CliError(message, EXIT_BAD_INPUT)


def _lookup(name: str, table: dict[str, Any]) -> Any:
    folded = {k.lower(): v for k, v in table.items()}
    return folded.get(name.lower())


def resolve_model(name: str) -> ModelSpec:
    """A catalog name (any case), a local preset name, or a Hugging Face model directory."""
    spec = _lookup(name, MODELS)
    if spec is not None:
        return spec
    from distzo.data.presets import PRESETS

    if name in PRESETS:
        from distzo.data.presets import preset_config

        return ModelSpec.from_hf_config(preset_config(name), name=name)  # its real vocabulary, as built
    from distzo.data import catalog
    from distzo.model.modeldir import read_config

    if name in catalog.CATALOG and catalog.CATALOG[name].kind == "model":
        return ModelSpec.from_hf_config(read_config(catalog.locate(name)), name=name)  # MaterialError: fetch first
    if (Path(name) / "config.json").is_file():  # planning only: no numeric check of the family
        return ModelSpec.from_hf_config(read_config(name), name=Path(name).name)
    raise bad_input(f"unknown model {name!r}; known models: {', '.join(MODELS)} "
                    f"(or a preset: {', '.join(PRESETS)}; or a model directory)")


def resolve_cluster(args: argparse.Namespace) -> ClusterSpec:
    base = _lookup(args.cluster, CLUSTERS)
    if base is None:
        raise bad_input(f"unknown cluster {args.cluster!r}; known clusters: {', '.join(CLUSTERS)}")
    return with_overrides(base, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                          gpus_per_worker=getattr(args, "gpus_per_worker", None), fetch_group=getattr(args, "fetch_group", None),
                          replicas=False if args.no_replicas else None)


# every number a plan takes: (flag, lowest, highest); checked before anything is loaded
RANGES = (("nodes", 1, 1 << 16), ("gpus_per_node", 1, 1 << 10), ("gpus_per_worker", 1, 1 << 10), ("fetch_group", 1, 1 << 10),
          ("tokens_per_step", 1, 1 << 40), ("seq_len", 1, 1 << 24), ("q", 1, 4096), ("shards", 1, 1 << 16),
          ("lora_rank", 1, 4096), ("prefix_tokens", 1, 4096))


def check_ranges(args: argparse.Namespace) -> None:
    """One line naming the flag, its range and the value given, for a number out of its range."""
    for dest, low, high in RANGES:
        value = getattr(args, dest, None)
        if value is not None and not low <= value <= high:
            raise bad_input(f"--{dest.replace('_', '-')} must be an integer from {low} to {high}, got {value}")
    eps = getattr(args, "eps", None)
    if eps is not None and not (math.isfinite(eps) and eps > 0):
        raise bad_input(f"--eps must be a finite number > 0, got {eps}")


PLAN_DEFAULTS = {"tokens_per_step": DEFAULT_TOKENS, "served_dtype": "bfloat16", "optimizer": "sgd", "target": "full",
                 "q": 1}


def apply_config(args: argparse.Namespace) -> None:
    """Fill the flags not given from --config's job (or the plan's defaults). ConfigError (exit 2) for a bad file."""
    if getattr(args, "config", None):
        from distzo.common.config import JobConfig

        cfg = JobConfig.from_yaml(args.config)
        t, d = cfg.train, cfg.data
        job = {"model": cfg.model.source, "tokens_per_step": t.batch_size * d.max_seq_len, "seq_len": d.max_seq_len,
               "served_dtype": cfg.server.served_dtype, "optimizer": t.optimizer, "target": t.target, "q": cfg.layout.q,
               "lora_rank": t.lora_rank, "lora_modules": ",".join(t.lora_modules) if t.lora_modules else None,
               "prefix_tokens": t.prefix_tokens,
               "update_window": cfg.server.update_window}
        cluster = _lookup(args.cluster, CLUSTERS)
        if cluster is not None and cluster.device == "cpu" and args.nodes is None and args.gpus_per_node is None:
            # a CPU cluster runs this job's workers as processes of one host (cpu-netns: one per host)
            job["layout"] = cfg.layout.name
            if cluster.name == "cpu-netns":
                job.update(nodes=cfg.cluster.hosts, gpus_per_node=cfg.layout.workers // cfg.cluster.hosts)
            else:
                job["gpus_per_node"] = cfg.layout.workers
        for key, value in job.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    if getattr(args, "model", None) is None:
        raise bad_input("--model NAME or --config FILE is required (a job config: its model, batch and sequence length)")
    for key, value in PLAN_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def plan(args: argparse.Namespace) -> tuple[ModelSpec, ClusterSpec, Prediction, Recommendation]:
    """The prediction shown (the --layout asked for, or the recommended one) and the recommendation."""
    apply_config(args)
    check_ranges(args)
    model = resolve_model(args.model)
    try:
        cluster = resolve_cluster(args)
        seq = args.seq_len or min(DEFAULT_SEQ, args.tokens_per_step)
        opt = getattr(args, "optimizer", "sgd")
        target = resolve_target(args, model)
        window = getattr(args, "update_window", None)
        if window is not None and window < 1:
            raise ValueError(f"--update-window {window}: expected an integer >= 1")
        rec = recommend(model, cluster, args.tokens_per_step, args.served_dtype, seq, q=args.q, shards=args.shards,
                        optimizer=opt, target=target, window=window)
        pred = rec.prediction
        if args.layout:
            layout = _layout(args.layout, cluster, args.q)
            pred = predict(model, cluster, layout, args.tokens_per_step, args.served_dtype, seq, shards=rec.prediction.shards,
                           optimizer=opt, target=target, window=rec.window)
    except ValueError as exc:
        raise bad_input(str(exc)) from None
    return model, cluster, pred, rec


def _layout(name: str, cluster: ClusterSpec, q: int) -> LayoutSpec:
    """--layout on the cluster's workers; refused (ValueError) naming how the workers are counted and the
    --gpus-per-worker values that give a worker count the layout takes."""
    try:
        return LayoutSpec.from_name(name, cluster.workers, q)
    except ValueError as exc:
        unit = cluster.wording.unit
        gpus = cluster.nodes * cluster.gpus_per_node
        fits = [g for g in range(1, cluster.gpus_per_node + 1) if cluster.gpus_per_node % g == 0 and _takes(name, gpus // g, q)]
        counted_as = (f"{counted(cluster.nodes, 'node')} x {counted(cluster.gpus_per_node, unit)} "
                      f"(--nodes, --gpus-per-node), {counted(cluster.worker_gpus, unit)} per worker (--gpus-per-worker)")
        hint = ("; " + " or ".join(f"--gpus-per-worker {g} gives {counted(gpus // g, 'worker')}" for g in fits)
                if fits else f"; no --gpus-per-worker gives layout {name} a worker count it takes on "
                f"{counted(gpus, unit)}: change --nodes or --gpus-per-node")
        raise ValueError(f"{exc}; the cluster's workers are {counted_as}{hint}") from None


def _takes(name: str, workers: int, q: int) -> bool:
    try:
        LayoutSpec.from_name(name, workers, q)
        return True
    except ValueError:
        return False


def cmd_plan(args: argparse.Namespace) -> int:
    model, cluster, pred, rec = plan(args)
    peers = predict_peers(model, cluster, args.tokens_per_step, _peer_dtype(args.served_dtype)) if args.peers else []
    kept = perturbation_report(args, pred)
    if args.json:
        out = {"model": model.to_dict(), "cluster": cluster.to_dict(), "prediction": pred.to_dict(),
               "recommended": rec.to_dict()}
        if args.peers:
            out["peers"] = [p.to_dict() for p in peers]
        if kept is not None:
            out["perturbation"] = kept.as_dict()
        print_json(out)
    else:
        print(render(model, cluster, pred, rec))
        if peers:
            print(render_peers(pred, peers))
        if kept is not None:
            print("\nperturbation (the model's weights, distzo/train/precision.py)\n  " + kept.line()
                  + (f"\n  {kept.warning()}" if kept.warning() else ""))
    return 0


def weights_dir(name: str) -> Path | None:
    """Where the weights of ``--model`` are, when they are at hand: a preset, a fetched model, a model directory."""
    from distzo.data import catalog
    from distzo.data.presets import PRESETS, preset_dir

    if name in PRESETS:
        return preset_dir(name)
    if name in catalog.CATALOG and catalog.CATALOG[name].kind == "model":
        return catalog.locate(name) if catalog.is_fetched(name) else None
    path = Path(name)
    return path if (path / "config.json").is_file() and any(path.glob("*.safetensors")) else None


def perturbation_report(args: argparse.Namespace, pred: Prediction):  # noqa: ANN201 - precision.PerturbationReport | None
    """What the plan's forwards (its compute dtype, --eps, the served dtype) keep of the perturbation on the model's
    own weights (``distzo.train.precision.measure``; full target only); None without weights at hand."""
    if getattr(args, "target", "full") != "full":
        return None
    path = weights_dir(args.model)
    if path is None:
        return None
    from distzo.model.blocks import DTYPES
    from distzo.model.families import load_model
    from distzo.train.plan import direction_seed
    from distzo.train.precision import ModelDirSource, measure
    from distzo.zo.forwardweights import forward_precision

    from distzo.train.defaults import EPS

    eps = getattr(args, "eps", None)  # --eps, else the full target's default (train.eps is null: chosen by target)
    precision = forward_precision(eps if eps is not None else EPS["full"], DTYPES[pred.compute_dtype],
                                  _train_default("eps_bf16"))
    manifest = load_model(path).manifest
    return measure(manifest, ModelDirSource(path), precision, pred.served_dtype, _train_default("distribution"),
                   direction_seed(_train_default("seed"), 0, 0))


def _peer_dtype(served_dtype: str) -> str:
    return served_dtype if served_dtype != "float32" else "float16"  # the peers keep a 16-bit master
