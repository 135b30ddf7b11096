"""What the split costs, in one report: rerun the cost benchmarks and regenerate ``benchmarks/RESULTS.md``.

    python benchmarks/report.py              # reruns split_overhead, clients, slow_link, load_memory (~17 min on 2 cores)
    python benchmarks/report.py --quick      # the same with each benchmark's smoke run
    python benchmarks/report.py --no-run     # RESULTS.md and the plot from the JSON already in results/

``slow_link.py`` needs Linux and root (a network namespace shaped with tc); elsewhere its section says why it was
skipped. The sections of ``quantization_quality.py``, ``wire_quality.py``, ``chunked_loss.py``, ``client_memory.py`` and
``estimate_check.py`` are read from their JSON as it is: each of those scripts reruns itself. The report holds every
table, each target with the figure that meets or misses it, the machine and date of each run, and
``results/ratios.png`` (matplotlib): every ratio beside its target. ``generate_grid.py`` (hours for the whole grid on
2 cores) is not rerun here either: its section and ``results/generate_grid.png`` read ``results/generate_grid.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHMARKS = {  # script -> (its JSON, extra arguments of a full run)
    "split_overhead.py": ("split_overhead.json", []),
    "clients.py": ("clients.json", []),
    "slow_link.py": ("slow_link.json", []),
    "load_memory.py": ("load_memory.json", []),
}


def rerun(quick: bool) -> None:
    for script, (_, extra) in BENCHMARKS.items():
        args = ["--quick"] if quick and script != "load_memory.py" else ([] if quick else extra)
        if quick and script == "load_memory.py":
            args = ["--size", "small"]
        print(f"== {script} {' '.join(args)}", flush=True)
        began = time.perf_counter()
        subprocess.run([sys.executable, str(HERE / script), *args], check=True)
        print(f"== {script} took {time.perf_counter() - began:.0f} s", flush=True)


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def where(data: dict) -> str:
    m = data.get("machine")
    if not m:
        return "machine not recorded"
    return f"{m['date'][:10]}, {m['cpu_count']} cores, {m['platform']}, torch {m['torch']}, Python {m['python']}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


class Targets:
    """Each target with its figure: the report's first table and the plot's reference lines."""

    def __init__(self) -> None:
        self.rows: list[list[str]] = []

    def add(self, what: str, figure: float | None, limit: float, at_most: bool = True, fmt: str = "{:.3f}",
            fastest: float | None = None) -> None:
        """``fastest``: the same ratio of the fastest steps (a machine that slows down mid-run moves it less)."""
        bound = ("<= " if at_most else ">= ") + fmt.format(limit)
        also = fmt.format(fastest) if fastest is not None else "-"
        if figure is None:
            self.rows.append([what, "not measured", also, bound, "-"])
            return
        met = figure <= limit if at_most else figure >= limit
        self.rows.append([what, fmt.format(figure), also, bound,
                          "met" if met else f"**missed by {abs(figure - limit) / limit:.1%}**"])


def overhead_runs(data: dict) -> dict[str, dict]:
    """Each figure's row: ``local``/``tcp`` runs of the one-process job, ``dist`` runs of their torchrun jobs."""
    return {r["run"]: r for r in data["runs"] if r["job"] == "one process" or r["run"].startswith("dist/")}


def overhead_section(data: dict, targets: Targets) -> list[str]:
    runs = overhead_runs(data)
    for name in ("local/float32", "local/bfloat16"):
        targets.add(f"{name}: step time / unsplit floor", runs[name]["ratio_to_unsplit"], 1.02,
                    fastest=runs[name]["min_ratio_to_unsplit"])
    for name in ("tcp/float32", "dist/float32"):
        targets.add(f"{name}: step time / in process", runs[name]["ratio_to_in_process"], 1.05,
                    fastest=runs[name]["min_ratio_to_in_process"])
        targets.add(f"{name}: bytes / payload floor (hidden {data['shape']['hidden_size']})",
                    runs[name]["wire_to_payload"], 1.02)
    for transport in ("tcp", "dist"):
        ratio = runs[f"{transport}/bfloat16"]["wire_bytes_per_step"] / runs[f"{transport}/float32"]["wire_bytes_per_step"]
        targets.add(f"{transport}: bfloat16 bytes / float32 bytes", ratio, 0.505)
    def elsewhere(run: str) -> str:
        """``run``'s median in each torchrun job over its median in the one process."""
        times = {r["job"]: r["median_ms"] for r in data["runs"] if r["run"] == run}
        return ", ".join(f"{times[job] / times['one process']:.3f}x in {job.split(', ')[1]}'s job"
                         for job in times if job != "one process")

    rows = [[r["job"], r["run"], f"{r['median_ms']:.0f}",
             f"{r['ratio_to_unsplit']:.3f}" if r["ratio_to_unsplit"] is not None else "-",
             f"{r['ratio_to_in_process']:.3f}", f"{r['min_ratio_to_in_process']:.3f}", f"{r['tokens_per_s']:.0f}",
             f"{r['wire_bytes_per_step'] / 2**20:.2f}" if r["wire_bytes_per_step"] else "-",
             f"{r['wire_to_payload']:.4f}" if r["wire_to_payload"] else "-", f"{r['max_loss_diff_vs_unsplit']:.1e}"]
            for r in data["runs"]]
    return [
        "## Split vs unsplit (`split_overhead.py`)", "",
        f"{data['params'] / 1e6:.1f}M-parameter Qwen2 shape (hidden {data['shape']['hidden_size']}, "
        f"{data['shape']['num_hidden_layers']} layers), cuts {tuple(data['cuts'])}, LoRA r={data['lora_r']} on the "
        f"trunk, frozen client, batch {data['batch']}x{data['length']}, fp32 compute, {data['threads']} torch threads "
        f"per process, median of {data['steps']} timed steps. The runs of a job take turns batch by batch, so the "
        f"machine's drift falls on all of them alike: one process runs unsplit, local and tcp (its server a "
        f"subprocess); each torchrun job runs unsplit, local/float32 and dist in its client rank, and dist is "
        f"compared with those. The payload floor is {data['payload_crossings']} crossings of B x T x H in the wire dtype. Ran "
        f"{where(data)}. The floor's median was {data['unsplit_median_first_half_ms']:.0f} ms over the first half "
        f"of the steps and {data['unsplit_median_second_half_ms']:.0f} ms over the second "
        f"({data['unsplit_median_second_half_ms'] / data['unsplit_median_first_half_ms'] - 1:+.1%}). The same "
        f"in-process run took {elsewhere('local/float32')} as in the one process, the unsplit floor "
        f"{elsewhere('unsplit')} (separate runs, so the machine's drift is in those figures).", "",
        *table(["job", "run", "ms/step", "x unsplit", "x in process", "fastest step x in process", "tokens/s",
                "MiB/step", "x payload floor", "max abs loss diff vs unsplit"], rows)]


def clients_section(data: dict, targets: Targets) -> list[str]:
    by = {r["clients"]: r for r in data["runs"]}
    if 2 in by:
        targets.add("2 clients over tcp: aggregate tokens/s / one client's", by[2]["ratio_to_one_client"], 1.5,
                    at_most=False, fmt="{:.2f}")
    rows = [[str(r["clients"]), f"{r['tokens_per_s']:.0f}", f"{r['ratio_to_one_client']:.2f}",
             " ".join(f"{x:.2f}" for x in r.get("rounds_ratio_to_one_client", [r["ratio_to_one_client"]])),
             f"{r['server_busy']:.2f}", " / ".join(f"{m:.0f}" for m in r["client_median_ms"])] for r in data["runs"]]
    return [
        "## Several clients, one server (`clients.py`)", "",
        f"The same model, cuts {tuple(data['cuts'])}, FedSGD over tcp on loopback (every client waits for the others "
        f"at each step), {data['steps']} timed steps per client. Client i is pinned to core i (one thread), the server "
        f"has one thread on any core. The median of {data.get('rounds', 1)} rounds; a round runs one client again at "
        f"its end, and each count is compared with the mean of the round's two one-client runs. "
        f"Ran {where(data)}.", "",
        *table(["clients", "tokens/s", "x one client", "x one client, every round", "server busy",
                "ms/step per client"], rows)]


def slow_link_section(data: dict, targets: Targets) -> list[str]:
    head = ["## A slow link, pipelined (`slow_link.py`)", ""]
    if "skipped" in data:
        targets.add("100 Mbit/s: pipelined step <= in process + half the transfer", None, 1.0)
        return [*head, f"Skipped on {where(data)}: {data['skipped']}.", ""]
    for r in data["runs"]:
        if r["rate"] == "100mbit" and r["pipeline"] > 1:
            targets.add(f"100 Mbit/s, {r['wire']}, pipelined: step ms / (in process + half the transfer)",
                        r["median_ms"] / r["target_ms"], 1.0)
            if r["wire"] == "bfloat16":
                targets.add("100 Mbit/s, bfloat16, pipelined: step time / in process", r["ratio_to_in_process"], 1.3)
        if r["rate"] == "20mbit" and r["pipeline"] > 1 and r["wire"] == "int8":
            targets.add("20 Mbit/s, int8, pipelined: step time / in process", r["ratio_to_in_process"], 1.3)
    float32 = {(r["rate"], r["pipeline"]): r["wire_bytes_per_step"] for r in data["runs"] if r["wire"] == "float32"}
    int8 = [r["wire_bytes_per_step"] / float32[r["rate"], r["pipeline"]] for r in data["runs"] if r["wire"] == "int8"]
    if int8:
        targets.add("int8 wire: bytes per step / float32's, headers included (highest)", max(int8), 0.27)
    rows = [[r["rate"], r["wire"], str(r["pipeline"]), f"{r['median_ms']:.0f}", f"{r['in_process_ms']:.0f}",
             f"{r['ratio_to_in_process']:.3f}", f"{r['added_ms']:.0f}", f"{r['wire_ms_at_rate']:.0f}",
             f"{r['hidden_share']:.2f}" if r["hidden_share"] is not None else "-",
             f"{r['target_ms']:.0f}" if r["target_ms"] is not None else "-",
             f"{r['wire_bytes_per_step'] / float32[r['rate'], r['pipeline']]:.3f}",
             f"{r['max_loss_diff_vs_unpipelined']:.1e}"] for r in data["runs"]]
    return [
        *head,
        f"The same model and batches, server and client in a network namespace of their own whose loopback (MTU "
        f"{data['mtu']}) is shaped by tbf; both directions share the rate. Per rate the in-process run and the tcp "
        f"runs take turns batch by batch in one client process, so the machine's drift falls on all of them alike. "
        f"Pipelined runs send each batch as {data['pipeline']} micro-batches in flight. Median of {data['steps']} "
        f"steps. Ran {where(data)}.", "",
        *table(["rate", "wire", "micro-batches", "ms/step", "in process, ms", "x in process", "added ms",
                "bytes at rate, ms", "share hidden", "target ms", "bytes x float32", "max abs loss diff vs unpipelined"],
              rows),
        "Added ms is the step time minus in process; the target is in process plus half of the unpipelined run's "
        "added ms; the share hidden is how much of that added time pipelining removes. Bytes are the transport's "
        "count per step, frame headers included. With the int8 wire the pipelined run's losses differ from the "
        "unpipelined run's by more than rounding: each micro-batch is quantized (and its residual carried) on its "
        "own.", ""]


def offload_section(data: dict, targets: Targets) -> list[str]:
    """``offload.py``: the pipelined split step with each party on a core of its own against the unsplit model on one,
    and the step-time model's predictions."""
    headline = next(r for r in data["runs"] if r["cuts"] == data["first_choice"])
    targets.add(f"offload, cut {tuple(headline['cuts'])}: pipelined split step / unsplit step on one core",
                data["ratio_to_unsplit"], 0.85, fastest=data["min_ratio_to_unsplit"])
    errors = sorted(abs(r["model_error"]) for r in data["runs"])
    fastest = sorted(abs(r["model_error_fastest"]) for r in data["runs"])
    targets.add(f"offload: step-time model's error, second best of {len(errors)} measured cuts",
                errors[1] if len(errors) > 1 else None, 0.10, fastest=fastest[1] if len(fastest) > 1 else None)
    fit = data["stage_fit_ms"]
    stages = [[name, f"{fit['fixed'][name]:.1f}", f"{fit['per_layer'][name]:.1f}"] for name in fit["fixed"]]
    runs = [[str(tuple(r["cuts"])), f"{r['split_median_ms']:.0f}", f"{r['unsplit_median_ms']:.0f}",
             f"{r['ratio_to_unsplit']:.3f}", f"{r['min_ratio_to_unsplit']:.3f}", f"{r['predicted_ms']:.0f}",
             f"{r['model_error']:+.1%}", f"{r['model_error_fastest']:+.1%}", f"{r['max_loss_diff_vs_unsplit']:.1e}"]
            for r in data["runs"]]
    best = [[name, str(tuple(r["cuts"])), f"{r['predicted_ms']:.0f}", f"{r['ratio_to_unsplit_estimate']:.3f}",
             str(tuple(data["best_ratio"][name]["cuts"])), f"{data['best_ratio'][name]['ratio_to_unsplit_estimate']:.3f}"]
            for name, r in data["best"].items()]
    loop = data["loopback"]
    shape = data["shape"]
    drift = ", ".join(f"{d:+.1%}" for d in data["unsplit_drift"].values())
    share = min(r["unsplit_cpu_share_min"] for r in data["runs"])
    load = data["load_average_1min"]
    return [
        "## Offload: each party on a core of its own (`offload.py`)", "",
        f"{data['params'] / 1e6:.1f}M-parameter Qwen2 shape (hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}), LoRA r={data['lora_r']} on the trunk, "
        f"frozen bottom and top, batch {data['batch']}x{data['length']} as {data['micro']} pipelined micro-batches, "
        f"fp32. The client is pinned to core {data['cores']['client']}, the trunk server (over tcp on loopback) to "
        f"core {data['cores']['server']}, one torch thread each; the unsplit model (LoRA on the same layers, same "
        f"initial adapters) runs alone on the client's core. Every cut's unsplit and split runs and the stage "
        f"timings take turns batch by batch; median of {data['steps']} timed steps. Noise: the unsplit medians moved "
        f"{drift} from the first half of the steps to the second, the unsplit steps had at least {share:.0%} of their "
        f"core, the 1-minute load average was {load[0]:.2f} before the timed runs and {load[1]:.2f} after (the "
        f"benchmark itself adds up to 2). Ran {where(data)}.", "",
        "Stage times per micro-batch on one core with one thread (fixed + per layer, from two splits of the model); "
        f"a crossing is {data['crossing_bytes'] / 1e3:.0f} kB, loopback {loop['rate'] / 1e9:.2f} GB/s and "
        f"{loop['latency'] * 1e6:.0f} us one way:", "",
        *table(["stage", "fixed ms", "ms per layer"], stages),
        *table(["cuts", "split ms/step", "unsplit ms/step", "x unsplit", "fastest x", "model ms", "model error",
                "fastest model error", "max abs loss diff"], runs),
        "Fastest x: the fastest split step / the fastest unsplit step; fastest model error: the model on the fastest "
        "repetition of each stage against the fastest split step (a busy machine moves both less).", "",
        "The model simulates the client's schedule (bottoms, then tops as the trunk's outputs come back, then the "
        "tops' backward passes sending dL/dh; the server's trunk passes in arrival order; a full-duplex link). The "
        f"fastest cut it finds for the client (slow links: {data['slow_link_latency_s'] * 1e3:.0f} ms one way; x "
        "unsplit estimated from the stages run one after another on one core, scaled by the measured unsplit "
        f"step / that sum, {data['unsplit_over_one_core_stages']:.3f}):", "",
        *table(["link", "fastest cut", "model ms/step", "x its unsplit (estimated)", "cut with the lowest x",
                "x its unsplit"], best),
        "A cut's unsplit step trains LoRA on that cut's trunk layers, so a deep trunk makes a slower floor: the "
        "fastest step and the lowest ratio can be different cuts.", ""]


def memory_section(data: dict, targets: Targets) -> list[str]:
    for r in data["rows"]:
        if r["mode"] == "selective":
            targets.add(f"loading, {r['part']}: peak RSS / its own bytes", r["ratio"], data["target"])
    rows = [[r["mode"], r["part"], f"{r['own_bytes'] / 2**20:.0f}", f"{r['bytes_read'] / 2**20:.0f}",
             f"{r['peak_rss_over_baseline'] / 2**20:.0f}", f"{r['ratio']:.3f}", f"{r['naive_ratio_for_this_party']:.3f}"]
            for r in data["rows"]]
    return [
        "## Loading each party's part (`load_memory.py`)", "",
        f"A {data['checkpoint_bytes'] / 2**20:.0f} MiB sharded checkpoint, cuts {tuple(data['cuts'])}; peak RSS over "
        f"the baseline after a 32-token forward pass, each in a fresh interpreter. Ran {where(data)}.", "",
        *table(["path", "part", "own MiB", "read MiB", "peak MiB", "peak / own", "naive peak / own"], rows)]


def quantization_section(data: dict, targets: Targets) -> list[str]:
    """``quantization_quality.py``: answer quality of the quickstart fit on a float32, int8 and nf4 base (no target;
    not rerun by this script, ~13 min a seed: ``python benchmarks/quantization_quality.py --seeds 0 1``)."""
    runs = [r for r in data["runs"] if r.get("ok")]
    num = lambda v, f="{:.3f}": f.format(v) if v is not None else "-"
    diff = lambda r, k, f="{:+.3f}": f.format(r["diff_vs_reference"][k]) if k in r.get("diff_vs_reference", {}) else "-"
    rows = [[r["run"], str(r["seed"]), num(r["exact_match"]), num(r["rouge_l"]), num(r["bleu"]),
             num(r["val_loss"], "{:.4f}"), num(r["val_perplexity"]), num(r["val_token_accuracy"], "{:.4f}"),
             f"{r['wall_s']:.0f}", diff(r, "exact_match"), diff(r, "rouge_l"), diff(r, "val_loss", "{:+.4f}"),
             diff(r, "wall_s_ratio", "{:.2f}x")] for r in runs]
    failed = [f"{r['run']} seed {r['seed']} ({r['status']})" for r in data["runs"] if not r.get("ok")]
    seeds = sorted({r["seed"] for r in runs})
    noise = []
    if len(seeds) > 1:
        spread = {name: s["exact_match"]["spread"] for name, s in data["summary"].items()
                  if "exact_match" in s and len(s["seeds"]) > 1}
        noise = [f"Exact match between seeds {', '.join(map(str, seeds))} (max - min): "
                 + ", ".join(f"{name} {value:.3f}" for name, value in spread.items())
                 + " (one seed's difference from the reference within that is indistinguishable from seed noise).", ""]
    loads = [x for r in runs for x in (r.get("load_1min_before"), r.get("load_1min_after")) if x is not None]
    if loads:
        noise += [f"Wall times are of a shared machine (1-minute load average {min(loads):.1f}-{max(loads):.1f} around "
                  f"the runs on {data['machine']['cpu_count']} cores): `wall x` is no speed measurement. The quickstart "
                  "base is random and a LoRA client cannot train its random embedding and head, hence the low "
                  "`lora/*` scores; quantizing random weights says little about a pretrained model's loss.", ""]
    return [
        "## Quantized base weights: answer quality (`quantization_quality.py`)", "",
        f"The quickstart fit (`{data['settings']['config']}`, steps: {data['settings']['steps']}, held-out rows: "
        f"{data['settings']['eval_rows']}) in a child process per run: `full/float32` is the config as is; the "
        f"`lora/*` runs train LoRA on the client's frozen base, float32 or quantized by bitsandbytes on both parties "
        f"(decoder-layer projections; embedding, norms, head float32, except that `+ int8 embedding` also stores the "
        f"client's tied embedding and head as int8 rows). Seed s sets `seed_everything`, `model.seed` "
        f"and `data.seed`. The last columns are each quantized run minus `{data['settings']['reference']}` of the "
        f"same seed (wall time as a ratio). Exact match, ROUGE-L and BLEU of the answers generated for the held-out "
        f"rows; validation loss, perplexity and token accuracy after training. Ran {where(data)}"
        + (f", splittrain at {', '.join(sorted({r['code']['commit'][:10] for r in runs if 'code' in r}))}"
           if any("code" in r for r in runs) else "") + ".", "",
        *table(["run", "seed", "exact match", "ROUGE-L", "BLEU", "val loss", "val ppl", "val token acc", "wall s",
                "EM diff", "ROUGE-L diff", "val loss diff", "wall x"], rows),
        *noise, *([f"Failed: {'; '.join(failed)}.", ""] if failed else [])]



def wire_quality_section(data: dict, targets: Targets) -> list[str]:
    """``wire_quality.py``: the quickstart trained with a float32, bfloat16 and int8 wire (not rerun by this script,
    ~15 min: ``python benchmarks/wire_quality.py``)."""
    runs = [r for r in data["runs"] if r.get("ok")]
    for r in runs:
        if r["kind"] == "short" and r["wire"] == "int8" and "val_loss_vs_float32" in r:
            targets.add(f"int8 wire, {data['short_steps']} quickstart steps: |val loss / float32 wire's - 1|",
                        abs(r["val_loss_vs_float32"]), 0.03)
    num = lambda v, f="{:.3f}": f.format(v) if v is not None else "-"
    rows = [[r["kind"], str(r["steps"]), r["wire"], num(r.get("val_loss"), "{:.4f}"),
             num(r.get("val_loss_vs_float32"), "{:+.2%}"), num(r.get("exact_match")), num(r.get("rouge_l")),
             num(r.get("bleu")), num(r.get("bytes_vs_float32"))] for r in runs]
    failed = [f"{r['kind']} {r['wire']} ({r['status']})" for r in data["runs"] if not r.get("ok")]
    return [
        "## The wire dtype: training quality (`wire_quality.py`)", "",
        f"The quickstart fit (`client: full`, so gradients cross both cuts) with each wire dtype, in a child process "
        f"per run: `short` is {data['short_steps']} steps validated once at the end, `full` the config as is "
        f"(validation, then the held-out rows answered by generation). The int8 wire sends a float32 scale per token "
        f"and carries each gradient's rounding error into the next (error feedback). Bytes are the in-process count "
        f"of tensor bytes. Ran {where(data)}, splittrain at {data['code']['commit'][:10]}.", "",
        *table(["run", "steps", "wire", "val loss", "vs float32", "exact match", "ROUGE-L", "BLEU", "bytes x float32"],
               rows),
        *([f"Failed: {'; '.join(failed)}.", ""] if failed else [])]


def chunked_loss_section(data: dict, targets: Targets) -> list[str]:
    """``chunked_loss.py``: one training step of a large-vocabulary top, whole logits vs chunks (no target; not rerun
    by this script: ``python benchmarks/chunked_loss.py``)."""
    shape = data["shape"]
    rows = [[r["head"], str(r["chunk"]) if r["chunk"] else "whole logits", f"{r['peak_mib']:.0f}",
             f"{r['peak_ratio']:.3f}", f"{r['saved_mib']:.0f}", f"{r['step_s']:.2f}", f"{r['time_ratio']:.3f}",
             f"{r['fastest_ratio']:.3f}", f"{r['loss_diff']:.1e}"] for r in data["runs"]]
    return [
        "## The chunked loss (`chunked_loss.py`)", "",
        f"One training step of a Qwen2 top (its last layer, final norm and untied head, fp32) at vocabulary "
        f"{shape['vocab_size']}, hidden {shape['hidden_size']}, {shape['rows']} x {shape['length']} tokens (one "
        f"float32 tokens x vocab tensor is {data['whole_logits_mib']:.0f} MiB), the head frozen (`client: lora`) or "
        f"trained (`client: full`). Peak RSS of the step over the RSS before it, in a fresh interpreter per "
        f"configuration; median of {data['rounds']} steps taken in turns. Ran {where(data)}.", "",
        *table(["head", "loss_chunk", "peak MiB", "x whole", "saved MiB", "s/step", "x whole", "fastest x whole",
                "loss diff"], rows)]


def client_memory_section(data: dict, targets: Targets) -> list[str]:
    """``client_memory.py``: the client's peak RSS and step time at a 152k vocabulary (not rerun by this script,
    ~15 min: ``python benchmarks/client_memory.py``)."""
    by = {r["config"]: r for r in data["runs"]}
    config = data.get("memory_config", "int8 + chunked + checkpointing")
    targets.add(f"client at a 152k vocabulary, {config}: peak RSS / plain", by[config]["memory_ratio"],
                data["memory_target"])
    targets.add("client at a 152k vocabulary, chunked + checkpointing: step time / plain",
                by["chunked + checkpointing"]["time_ratio"], data["time_target"])
    gib = lambda b: f"{b / 2**30:.2f}"
    rows = [[r["config"], gib(r["client_peak_bytes"]), f"{r['memory_ratio']:.3f}", f"{r['step_s']:.2f}",
             f"{r['time_ratio']:.3f}", f"{r['client_own_s']:.2f}", f"{r['own_time_ratio']:.3f}",
             gib(r["client_estimate"]["total"]), f"{r['estimate_over_measured']:.3f}", gib(r["server_peak_bytes"])]
            for r in data["runs"]]
    shape = data["shape"]
    return [
        "## The client at a 152k vocabulary (`client_memory.py`)", "",
        f"A {data['params'] / 1e6:.0f}M-parameter Qwen2 shape (vocab {shape['vocab_size']}, hidden "
        f"{shape['hidden_size']}, {shape['num_hidden_layers']} layers, tied embeddings, fp32) cut at "
        f"{tuple(data['cuts'])}: the client holds the embedding (also the head), the first and the last layer and "
        f"trains LoRA r{data['client_lora_r']}; the server trains LoRA r{data['trunk_lora_r']} on the others, the "
        f"same in every configuration. `serve` and `fit` are child processes over {data['transport']} on loopback, "
        f"batches of {data['rows']} x {data['length']} tokens, {data['steps']} steps (the first a warm-up). A "
        f"configuration sets only the client: plain is whole logits (`model.loss_chunk 0`) without checkpointing or "
        f"quantization, chunked is the default `loss_chunk` 512. Peak RSS of the fit process (loading included); the "
        f"median step (batch start to optimizer step) and the client's own part of it (the step minus its waits "
        f"for the server's replies). Configurations run one after another, so the machine's drift between them is "
        f"in the time ratios. The estimate is `splittrain estimate`'s client total. Ran {where(data)}.", "",
        *table(["client", "peak GiB", "x plain", "step s", "x plain", "own s", "x plain", "estimate GiB",
                "estimate / peak", "server peak GiB"], rows)]


def estimate_section(data: dict, targets: Targets) -> list[str]:
    """``estimate_check.py``: ``splittrain estimate`` against each party's measured peak RSS (not rerun by this
    script, ~20 min: ``python benchmarks/estimate_check.py``)."""
    sizes = list(dict.fromkeys(r["size"] for r in data["rows"]))
    for size in sizes:
        ratios = [r["estimate_over_measured"] for r in data["rows"] if r["size"] == size]
        what = f"estimate / peak RSS, {size} shape, {len(ratios) // 2} combinations x 2 parties"
        targets.add(f"{what}: lowest", min(ratios), 1 - data["target"], at_most=False)
        targets.add(f"{what}: highest", max(ratios), 1 + data["target"])
    gib = lambda b: f"{b / 2**30:.3f}"
    rows = []
    for size in sizes:
        for combo in dict.fromkeys(r["combo"] for r in data["rows"] if r["size"] == size):
            party = {r["party"]: r for r in data["rows"] if (r["size"], r["combo"]) == (size, combo)}
            rows.append([size, combo, *(x for name in ("client", "server") for x in (
                gib(party[name]["measured_bytes"]), gib(party[name]["estimate"]["total"]),
                f"{party[name]['estimate_over_measured']:.3f}"))])
    params = {r["size"]: r["params"] for r in data["rows"]}
    shapes = "; ".join(f"{size}: {params[size] / 1e6:.0f}M parameters, hidden {shape['config']['hidden_size']}, "
                       f"{shape['config']['num_hidden_layers']} layers, cuts {tuple(shape['cuts'])}"
                       for size, shape in data["shapes"].items() if size in params)
    return [
        "## The memory estimate against measured peaks (`estimate_check.py`)", "",
        f"Random Qwen2 shapes (vocab 32000, fp32, tied embeddings; {shapes}) trained split over tcp on loopback, "
        f"`serve` and `fit` as child processes: {data['steps']} steps of {data['batch']} x {data['length']} tokens "
        f"and one validation batch, client LoRA r8, trunk LoRA r16. A combination "
        f"`quantization/loss_chunk/checkpointing` sets both parties (loss_chunk 0: whole logits). Measured: each "
        f"process's peak RSS (`ru_maxrss`); estimate: `splittrain.estimate_memory` with the same settings, on CPU. "
        f"Ran {where(data)}.", "",
        *table(["shape", "combination", "client peak GiB", "estimate", "ratio", "server peak GiB", "estimate",
                "ratio"], rows)]


QUIET = 3.0
"""A grid cell measured while the 1-minute load average stayed under this counts as measured on a quiet machine."""


def grid_order(cell: dict) -> tuple:
    return cell["dtype"] != "float32", cell["dtype"], cell["batch"], cell["input"], cell["output"]


def grid_label(cell: dict) -> str:
    return f"{SHORT[cell['dtype']]} b{cell['batch']} {cell['input']}+{cell['output']}"


def generate_grid_section(data: dict, targets: Targets) -> list[str]:
    """``generate_grid.py``: split generation over prompt lengths x output lengths x batch sizes, each mode beside
    ``transformers``' ``generate``, on one machine in one run per invocation."""
    cells = sorted(data["cells"], key=grid_order)
    limit = data["targets"]

    def worst(mode: str, batch: int = 1) -> dict | None:
        rows = [c for c in cells if mode in c["runs"] and c["batch"] >= batch]
        return min(rows, key=lambda c: c["runs"][mode]["ratio_tokens_per_s"]) if rows else None

    for mode, batch, what in (("in process", 1, "in process, every cell"), ("tcp", 8, "loopback tcp, batch 8")):
        cell = worst(mode, batch)
        rows = [c for c in cells if mode in c["runs"] and c["batch"] >= batch]
        within = sum(c["runs"][mode]["ratio_tokens_per_s"] >= limit[mode] for c in rows)
        fastest = min((c["runs"][mode].get("ratio_fastest", float("inf")) for c in rows), default=None)
        targets.add(f"generate grid, {what}: split tokens/s / transformers' (worst cell"
                    f"{', ' + grid_label(cell) if cell else ''}; {within} of {len(rows)} cells met)",
                    cell["runs"][mode]["ratio_tokens_per_s"] if cell else None, limit[mode], at_most=False,
                    fastest=fastest if fastest != float("inf") else None)
        cpu = [c for c in rows if "ratio_cpu" in c["runs"][mode]]
        if cpu:
            low = min(cpu, key=lambda c: c["runs"][mode]["ratio_cpu"])
            met = sum(c["runs"][mode]["ratio_cpu"] >= limit[mode] for c in cpu)
            targets.add(f"generate grid, {what}: split tokens per CPU-second (client + server) / transformers' "
                        f"(worst cell, {grid_label(low)}; {met} of {len(cpu)} cells met)",
                        low["runs"][mode]["ratio_cpu"], limit[mode], at_most=False)
    shaped = [c for c in cells if "model_error" in c["runs"].get("shaped", {})]
    if shaped:
        cell = max(shaped, key=lambda c: abs(c["runs"]["shaped"]["model_error"]))
        within = sum(abs(c["runs"]["shaped"]["model_error"]) <= limit["shaped_error"] for c in shaped)
        fastest = [abs(c["runs"]["shaped"]["model_error_p10"]) for c in shaped
                   if "model_error_p10" in c["runs"]["shaped"]]
        targets.add(f"generate grid, 100 Mbit/s + 20 ms: per-token latency vs model, largest error "
                    f"({grid_label(cell)}; {within} of {len(shaped)} cells within)",
                    abs(cell["runs"]["shaped"]["model_error"]),
                    limit["shaped_error"], fmt="{:.1%}", fastest=max(fastest) if fastest else None)
    else:
        targets.add("generate grid, 100 Mbit/s + 20 ms: per-token latency vs model", None, limit["shaped_error"],
                    fmt="{:.1%}")
    quiet = [c for c in cells if max(c["load_average_1min"]) < QUIET]
    for mode, key, at_most, what in (("in process", "ratio_tokens_per_s", False, "split tokens/s / transformers'"),
                                     ("shaped", "model_error", True, "per-token latency off the model")):
        rows = [c for c in quiet if key in c["runs"].get(mode, {})]
        if rows:
            values = [abs(c["runs"][mode][key]) if at_most else c["runs"][mode][key] for c in rows]
            bound = limit["shaped_error"] if at_most else limit[mode]
            met = sum(v <= bound if at_most else v >= bound for v in values)
            targets.add(f"generate grid, {mode}, the {len(rows)} cells at load < {QUIET:g}: {what}, worst ({met} met)",
                        max(values) if at_most else min(values), bound, at_most=at_most,
                        fmt="{:.1%}" if at_most else "{:.3f}")
    modes = [m for m in ("in process", "tcp", "shaped") if any(m in c["runs"] for c in cells)]

    def pick(cell: dict, mode: str, key: str, fmt: str, scale: float = 1.0) -> str:
        value = cell["runs"].get(mode, {}).get(key)
        return fmt.format(value * scale) if value is not None else "-"

    speed = [[c["dtype"], str(c["batch"]), str(c["input"]), f"{c['output']}{' (capped)' if c['capped'] else ''}",
              pick(c, "transformers", "ttft_ms", "{:.0f}"),
              f"{pick(c, 'transformers', 'per_token_ms_median', '{:.1f}')} / "
              f"{pick(c, 'transformers', 'per_token_ms_p90', '{:.1f}')}",
              pick(c, "transformers", "tokens_per_s", "{:.1f}"),
              *(f"{pick(c, m, 'ratio_tokens_per_s', '{:.3f}')} ({pick(c, m, 'ratio_cpu', '{:.3f}')})"
                for m in modes),
              "yes" if all(r["same_tokens"] for r in c["runs"].values()) else "**no**",
              f"{c['load_average_1min'][0]:.1f} -> {c['load_average_1min'][1]:.1f}"] for c in cells]
    latency = [[c["dtype"], str(c["batch"]), str(c["input"]), str(c["output"]),
                *(f"{pick(c, m, 'ttft_ms', '{:.0f}')}" for m in modes),
                *(f"{pick(c, m, 'per_token_ms_median', '{:.1f}')} / {pick(c, m, 'per_token_ms_p90', '{:.1f}')}"
                  for m in modes),
                pick(c, "shaped", "predicted_per_token_ms", "{:.1f}"), pick(c, "shaped", "model_error", "{:+.1%}"),
                pick(c, "shaped", "model_error_p10", "{:+.1%}"), loopback_model(c, data),
                *(f"{pick(c, m, 'request_ms_median', '{:.1f}')} / {pick(c, m, 'client_ms_median', '{:.1f}')}"
                  for m in modes if m != "in process")] for c in cells]
    wire = [[c["dtype"], str(c["batch"]), str(c["input"]), str(c["output"]),
             f"{c['runs']['tcp']['cut_bytes_per_step']['cut1_up'] / c['batch']:.0f}",
             f"{c['runs']['tcp']['cut_bytes_per_step']['cut2_down'] / c['batch']:.0f}",
             pick(c, "tcp", "wire_bytes_per_step", "{:.0f}"), pick(c, "tcp", "round_trips_per_step", "{:.0f}"),
             pick(c, "tcp", "prefill_wire_bytes", "{:.2f}", 2**-20)] for c in cells if "tcp" in c["runs"]]
    memory = []
    for c in cells:
        mem = next((c["runs"][m]["memory_mib"] for m in modes if m in c["runs"]), None)
        hf = c["runs"]["transformers"]["memory_mib"]
        memory.append([c["dtype"], str(c["batch"]), str(c["input"]), str(c["output"]),
                       f"{hf['weights']:.0f} + {hf['kv_cache']:.1f}",
                       f"{mem['client_weights']:.0f} + {mem['client_kv_cache']:.1f}" if mem else "-",
                       f"{mem['server_weights']:.0f} + {mem['server_kv_cache']:.1f}" if mem else "-",
                       pick(c, "tcp", "server_idle_rss_mib", "{:.0f}"), pick(c, "tcp", "server_peak_rss_mib", "{:.0f}"),
                       pick(c, "transformers", "client_rss_growth_mib", "{:.0f}"),
                       pick(c, "in process", "client_rss_growth_mib", "{:.0f}"),
                       pick(c, "tcp", "client_rss_growth_mib", "{:.0f}")])
    batching = []
    for c in cells:
        single = next((o for o in cells if o["batch"] == 1 and (o["dtype"], o["input"], o["output"]) ==
                       (c["dtype"], c["input"], c["output"])), None)
        if c["batch"] > 1 and single is not None:
            batching.append([c["dtype"], f"{c['input']}+{c['output']}", str(c["batch"]),
                             *(f"{c['runs'][m]['tokens_per_s'] / single['runs'][m]['tokens_per_s']:.2f}"
                               if m in c["runs"] and m in single["runs"] else "-" for m in ("transformers", *modes))])
    shape, runs = data["shape"], data["log"]
    ran = "; ".join(f"`{r['cells']}`, {r['reps']} repetition(s), load {r['load_average_1min'][0]:.1f} -> "
                    f"{r['load_average_1min'][-1]:.1f}, {r['elapsed_s'] / 60:.0f} min" for r in runs)
    skipped = "".join(f" The {m} mode was skipped: {why}." for m, why in data["skipped"].items())
    loaded = load("generate_grid_loaded.json")
    if loaded is not None:
        first = [c for c in loaded["cells"] if c["dtype"] == "float32" and c["output"] <= 128 and c["input"] <= 512]
        loads = [x for c in first for x in c["load_average_1min"]]

        def span(mode: str, key: str, fmt: str) -> str:
            values = [c["runs"][mode][key] for c in first if key in c["runs"].get(mode, {})]
            return f"{fmt.format(min(values))} to {fmt.format(max(values))}" if values else "-"

        skipped += (f" A first pass of the {len(first)} float32 cells with prompts up to 512 and up to 128 new tokens "
                    f"ran while other jobs held the machine (1-minute load {min(loads):.1f} to {max(loads):.1f}) "
                    "and is kept in `results/generate_grid_loaded.json`: wall-clock tokens/s in process "
                    f"{span('in process', 'ratio_tokens_per_s', '{:.2f}')}x `transformers`' (per CPU-second "
                    f"{span('in process', 'ratio_cpu', '{:.3f}')}x), over loopback tcp "
                    f"{span('tcp', 'ratio_tokens_per_s', '{:.2f}')}x ({span('tcp', 'ratio_cpu', '{:.3f}')}x), the "
                    f"shaped link {span('shaped', 'model_error', '{:+.0%}')} off its model; the tables below hold "
                    "these cells measured again on a quieter machine.")
    return [
        "## Split generation over a grid (`generate_grid.py`)", "",
        f"{data['params'] / 1e6:.1f}M-parameter Qwen2 shape (hidden {shape['hidden_size']}, "
        f"{shape['num_hidden_layers']} layers, {shape['num_key_value_heads']} KV heads, vocab {shape['vocab_size']}, "
        f"context {shape['max_position_embeddings']}), cuts {tuple(data['cuts'])}, random prompts of the cell's "
        f"length, greedy, no stop token, every cache a `{data['cache']}`, {data['threads']} torch thread(s) per "
        "process. In "
        "each cell `transformers`' `generate` of the unsplit model and split generation in process, over tcp on "
        f"loopback (the trunk server a process of its own) and over tcp shaped to {data['rate']} each way with "
        f"{data['delay_ms']:.0f} ms each way (a veth pair between two network namespaces, tbf on both ends; the "
        "delay added by a relay in the server's process, as this kernel has no netem) take turns repetition by "
        "repetition; medians over repetitions, per-token latencies pooled. The wire dtype is the compute dtype. "
        f"Invocations (the machine is shared: the 1-minute load average includes other jobs): {ran}.{skipped} "
        f"Ran {where(data)}.", "",
        "![generation grid](results/generate_grid.png)", "",
        "Tokens/s of each mode / `transformers`' in the same cell, and in brackets tokens per CPU-second of the "
        "client and the trunk server together / `transformers`' (what a machine of its own would show; the wall "
        "clock on this shared machine counts the time other jobs held the cores; load: the 1-minute load average "
        "when the cell began and when it ended):",
        "", *table(["dtype", "batch", "prompt", "new", "HF TTFT ms", "HF ms/token (median / p90)", "HF tokens/s",
                    *(f"{m} x HF" for m in modes), "same tokens", "load"], speed),
        "Time to first token and per-token latency (median / p90, ms) per mode; the shaped link's model is "
        "`transformers`' per-token time + 2 x delay x round trips per token + bytes per token / rate (medians; the "
        "fastest decile: the 10th percentile of the shaped link's per-token times against the model on "
        "`transformers`' 10th percentile, what a quieter machine would show); the loopback model puts the loopback "
        "tcp per-token time in place of `transformers`' (what the split itself costs without the link); a remote "
        "decode step split in two (medians): the trunk's request (server compute + link) and the client's work "
        "between requests (top, choosing the token, bottom):", "",
        *table(["dtype", "batch", "prompt", "new", *(f"TTFT {m}" for m in modes), *(f"ms/token {m}" for m in modes),
                "shaped model ms", "shaped vs model", "fastest decile vs model", "shaped vs loopback model",
                *(f"{m}: request / client ms" for m in modes if m != "in process")], latency),
        "Bytes per decode step: the payload crossing each cut per token (hidden states up with positions and the mask "
        "column, hidden states down), the transport's count per step (both directions, frame headers included), "
        "the requests per step, and the prompt's bytes (MiB):", "",
        *table(["dtype", "batch", "prompt", "new", "cut 1 B/token", "cut 2 B/token", "wire B/step",
                "round trips/step", "prompt MiB"], wire),
        "Memory per party, MiB: weights + KV cache at the end (exact), the tcp trunk server process's RSS with the "
        "trunk loaded (interpreter and libraries included) and its peak RSS during the run, "
        "and how far the client process's peak RSS rose above its RSS before the run (it also holds the other "
        "runs' weights):", "",
        *table(["dtype", "batch", "prompt", "new", "HF weights + KV", "client weights + KV", "server weights + KV",
                "server RSS before", "server peak RSS", "HF run growth", "in process run growth", "tcp run growth"], memory),
        "Batching: tokens/s of the batch / tokens/s of one row, same prompt and output lengths (what answering "
        "that many users in one trunk call would gain):", "",
        *table(["dtype", "cell", "batch", "transformers", *modes], batching)]


def loopback_model(cell: dict, data: dict) -> str:
    """The shaped per-token latency against loopback tcp's per-token time + the link's delay and bytes."""
    tcp, shaped = cell["runs"].get("tcp", {}), cell["runs"].get("shaped", {})
    if tcp.get("per_token_ms_median") is None or shaped.get("per_token_ms_median") is None:
        return "-"
    rate = {"k": 1e3, "m": 1e6, "g": 1e9}[data["rate"].removesuffix("bit")[-1]] * float(data["rate"][:-4])
    model = (tcp["per_token_ms_median"] + 2 * data["delay_ms"] * shaped["round_trips_per_step"]
             + shaped["wire_bytes_per_step"] * 8 / rate * 1e3)
    return f"{shaped['per_token_ms_median'] / model - 1:+.1%}"


def plot_grid(data: dict, path: Path) -> None:
    """Each mode's tokens/s / transformers' per cell (targets dashed), and the shaped link's per-token latency beside
    its model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells, limit = sorted(data["cells"], key=grid_order), data["targets"]
    names = [grid_label(c) for c in cells]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(10, 0.55 * len(cells) * 2), 4.6))
    modes = [m for m in ("in process", "tcp", "shaped") if any(m in c["runs"] for c in cells)]
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        left.bar([x + (i - (len(modes) - 1) / 2) * width for x in range(len(cells))],
                 [c["runs"].get(mode, {}).get("ratio_tokens_per_s", 0) for c in cells], width, label=mode)
    left.axhline(limit["in process"], color="#c44e52", linestyle="--", linewidth=0.8, label="in process target")
    left.axhline(limit["tcp"], color="#8172b2", linestyle=":", linewidth=0.8, label="tcp target (batch 8)")
    left.set_xticks(range(len(cells)), names, rotation=60, ha="right", fontsize=7)
    left.set_title("split tokens/s / transformers'", fontsize=10)
    left.legend(fontsize=7)
    shaped = [c for c in cells if "predicted_per_token_ms" in c["runs"].get("shaped", {})]
    if shaped:
        xs = range(len(shaped))
        right.bar([x - 0.2 for x in xs], [c["runs"]["shaped"]["per_token_ms_median"] for c in shaped], 0.4,
                  label="measured")
        right.bar([x + 0.2 for x in xs], [c["runs"]["shaped"]["predicted_per_token_ms"] for c in shaped], 0.4,
                  label="model")
        right.set_xticks(list(xs), [grid_label(c) for c in shaped], rotation=60, ha="right", fontsize=7)
        right.legend(fontsize=7)
    right.set_title(f"{data['rate']} + {data['delay_ms']:.0f} ms: ms per token", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "i8"}


def slow_target(run: dict) -> float | None:
    """The limit of a pipelined slow-link run as a ratio to in process (the tighter one for bfloat16 at 100 Mbit/s)."""
    if run["target_ms"] is None:
        return None
    limit = run["target_ms"] / run["in_process_ms"]
    return min(limit, 1.3) if run["rate"] == "100mbit" and run["wire"] == "bfloat16" else limit


def plot(sections: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "overhead" in sections:
        runs = overhead_runs(sections["overhead"])
        panels.append(("step time: split / unsplit, remote / in process",
                       [("in process / unsplit", runs["local/float32"]["ratio_to_unsplit"], 1.02),
                        *((f"{name.replace('/float32', ' f32').replace('/bfloat16', ' bf16')} / in process",
                           runs[name]["ratio_to_in_process"], 1.05 if name.endswith("float32") else None)
                          for name in ("tcp/float32", "dist/float32", "tcp/bfloat16", "dist/bfloat16"))]))
    if "clients" in sections:
        panels.append(("aggregate tokens/s / one client's",
                       [(f"{r['clients']} clients", r["ratio_to_one_client"], 1.5 if r["clients"] == 2 else None)
                        for r in sections["clients"]["runs"]]))
    if "slow" in sections and "skipped" not in sections["slow"]:
        panels.append(("slow link: step time / in process",
                       [(f"{r['rate']} {SHORT[r['wire']]}" + (f" x{r['pipeline']} micro" if r["pipeline"] > 1 else ""),
                         r["ratio_to_in_process"], slow_target(r))
                        for r in sections["slow"]["runs"]]))
    if "offload" in sections:
        offload = sections["offload"]
        panels.append(("offload: split step / unsplit, a core each",
                       [(f"cuts {tuple(r['cuts'])}", r["ratio_to_unsplit"],
                         0.85 if r["cuts"] == offload["first_choice"] else None) for r in offload["runs"]]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, (title, bars) in zip(axes[0], panels):
        names = [b[0] for b in bars]
        ax.bar(range(len(bars)), [b[1] for b in bars], color="#4c72b0")
        for i, (_, _, limit) in enumerate(bars):
            if limit is not None:
                ax.hlines(limit, i - 0.4, i + 0.4, colors="#c44e52", linestyles="--",
                          label="target" if i == next(j for j, b in enumerate(bars) if b[2] is not None) else None)
        ax.set_xticks(range(len(bars)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.axhline(1.0, color="grey", linewidth=0.6)
        if any(b[2] is not None for b in bars):
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-run", action="store_true", help="only regenerate RESULTS.md from results/*.json")
    parser.add_argument("--quick", action="store_true", help="each benchmark's smoke run")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    if not args.no_run:
        rerun(args.quick)

    targets, body, sections = Targets(), [], {}
    for key, name, section in (("overhead", "split_overhead.json", overhead_section),
                               ("clients", "clients.json", clients_section),
                               ("slow", "slow_link.json", slow_link_section),
                               ("offload", "offload.json", offload_section),
                               ("memory", "load_memory.json", memory_section),
                               ("quantization", "quantization_quality.json", quantization_section),
                               ("wire_quality", "wire_quality.json", wire_quality_section),
                               ("chunked", "chunked_loss.json", chunked_loss_section),
                               ("client_memory", "client_memory.json", client_memory_section),
                               ("estimate", "estimate_check.json", estimate_section),
                               ("generate_grid", "generate_grid.json", generate_grid_section)):
        data = load(name)
        if data is None:
            script = "report.py" if name in {json_name for json_name, _ in BENCHMARKS.values()} else name[:-5] + ".py"
            body += [f"`results/{name}` is missing: run `python benchmarks/{script}`.", ""]
            continue
        sections[key] = data
        body += section(data, targets)
    plot(sections, RESULTS / "ratios.png")
    if "generate_grid" in sections:
        plot_grid(sections["generate_grid"], RESULTS / "generate_grid.png")
    lines = [
        "# What the split costs", "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; each section names the machine "
        "and date of its run. Ratios are within one run (split vs unsplit, remote vs in process, on the same "
        "batches): absolute times depend on the machine.", "",
        "## Targets", "",
        *table(["what", "measured (medians)", "fastest steps", "target", ""], targets.rows),
        "![ratios](results/ratios.png)", "",
        *body]
    args.out.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.out} and {RESULTS / 'ratios.png'}")


if __name__ == "__main__":
    main()
