"""`distillery card`: a model card in the structure of the DistilGPT2 / DistilRoBERTa cards.

Every number comes from a file; what no file holds is written as "not measured". The files read:

    RUN/config.yaml            the recipe (trainer)             optional for a model folder
    RUN/metrics.jsonl          training log (trainer)           required for a run folder
    RUN/summary.json           steps, tokens, final losses, and `energy` when the trainer tracked it
    RUN/model/config.json      the model (a model folder: its own config.json)
    <eval>/perplexity*.json    `distillery eval perplexity ... --save`
    <eval>/glue-<task>.json    `distillery glue TASK ... --save`
    <eval>/bias.json           `distillery eval bias ... --save`
    <eval>/speed.json          `distillery eval speed STUDENT TEACHER --save`
    <eval>/energy.json         an EnergyTracker result (when not in summary.json)

<eval> is RUN/eval (or MODEL/eval). The teacher's numbers come from --teacher-eval DIR, a folder
with the same file names. Plots (loss.png, speed.png) are written next to the card.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillery.models.common import DistilleryError, plural

NOT_MEASURED = "not measured"
EVAL_DIR = "eval"


# ----------------------------------------------------------------------------------------------
# Reading what the run and the evaluations wrote


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DistilleryError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); rewrite it with --save.") from e


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DistilleryError(f"{path} line {number} is not JSON; the training log is damaged.") from e
    return records


def read_evals(directory: Path | None) -> dict[str, Any]:
    """{"perplexity": [...], "glue": {task: ...}, "bias", "speed", "energy"} from an eval folder."""
    found: dict[str, Any] = {"perplexity": [], "glue": {}, "sts": {}}
    if directory is None or not directory.is_dir():
        return found
    for path in sorted(directory.glob("perplexity*.json")):
        found["perplexity"].append(_read_json(path))
    for path in sorted(directory.glob("glue-*.json")):
        result = _read_json(path)
        found["glue"][result.get("task", path.stem[5:])] = result
    found["sts"] = {}
    for path in sorted(directory.glob("sts*.json")):
        result = _read_json(path)
        found["sts"][Path(result.get("data", path.stem)).name] = result
    for name in ("bias", "speed", "energy"):
        if (directory / f"{name}.json").is_file():
            found[name] = _read_json(directory / f"{name}.json")
    return found


def read_source(source: str | Path) -> dict[str, Any]:
    """What a run folder or a model folder holds, for the card."""
    from distillery.distill.run_config import read_yaml

    source = Path(source)
    if not source.is_dir():
        raise DistilleryError(f"{source} is not a folder; pass a run folder (config.yaml, metrics.jsonl) or a model folder.")
    is_run = (source / "config.yaml").is_file() or (source / "metrics.jsonl").is_file()
    if is_run and not (source / "metrics.jsonl").is_file():
        raise DistilleryError(
            f"{source} has no metrics.jsonl; a card needs the metrics a finished `distillery train/distill` run writes."
        )
    model_dir = source / "model" if is_run else source
    if not (model_dir / "config.json").is_file():
        raise DistilleryError(
            f"{model_dir} has no config.json; pass a run folder with its final model/ or a saved model folder."
        )
    info: dict[str, Any] = {"source": source, "is_run": is_run, "model_dir": model_dir,
                            "model_config": _read_json(model_dir / "config.json")}
    if is_run:
        info["metrics"] = read_metrics(source / "metrics.jsonl")
        if not info["metrics"]:
            raise DistilleryError(f"{source / 'metrics.jsonl'} is empty; the run logged no step.")
        if (source / "config.yaml").is_file():
            info["config"] = read_yaml(source / "config.yaml")
        if (source / "summary.json").is_file():
            info["summary"] = _read_json(source / "summary.json")
    info["evals"] = read_evals(source / EVAL_DIR)
    # A sentence encoder's run keeps the untrained student's scores in eval/before/.
    info["before"] = read_evals(source / EVAL_DIR / "before")
    # Other models to compare with, one folder each: eval/compare/<label>/ (e.g. another layer choice).
    compare = source / EVAL_DIR / "compare"
    info["compare"] = {p.name.replace("-", " "): read_evals(p) for p in sorted(compare.iterdir()) if p.is_dir()} \
        if compare.is_dir() else {}
    info["sentence_encoder"] = (model_dir / "modules.json").is_file()
    energy = info.get("summary", {}).get("energy") or info["evals"].get("energy")
    if energy:
        info["energy"] = energy
    return info


# ----------------------------------------------------------------------------------------------
# Plots


def plot_loss(metrics: list[dict[str, Any]], path: Path) -> bool:
    """Training and validation loss against steps; False when there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in metrics if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in metrics if "val_loss" in r]
    if not train and not val:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="training loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_speed(speed: dict[str, Any], path: Path) -> None:
    """Bars of student and teacher throughput (encoding, and decoding where measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("encode_tokens_per_s", "decode_tokens_per_s") if speed["student"].get(k)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4 * len(kinds), 3.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        values = [speed["teacher"][kind], speed["student"][kind]]
        ax.bar(["teacher", "student"], values, color=["tab:gray", "tab:blue"])
        ax.set_title(kind.replace("_tokens_per_s", "").replace("encode", "encoding").replace("decode", "decoding")
                     + " (tokens/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Sections


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return NOT_MEASURED
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _model_facts(cfg: dict[str, Any]) -> dict[str, Any]:
    """The family's name and sizes, read under the names its config.json uses."""
    model_type = cfg.get("model_type")
    if model_type == "gpt2":
        return {"family": "GPT-2", "layers": cfg.get("n_layer"), "hidden": cfg.get("n_embd"),
                "heads": cfg.get("n_head"), "context": cfg.get("n_positions"), "vocab": cfg.get("vocab_size")}
    if model_type == "distilbert":
        return {"family": "DistilBERT", "layers": cfg.get("n_layers"), "hidden": cfg.get("dim"),
                "heads": cfg.get("n_heads"), "context": cfg.get("max_position_embeddings"),
                "vocab": cfg.get("vocab_size")}
    return {"family": "BERT" if model_type == "bert" else "RoBERTa", "layers": cfg.get("num_hidden_layers"),
            "hidden": cfg.get("hidden_size"), "heads": cfg.get("num_attention_heads"),
            "context": cfg.get("max_position_embeddings"), "vocab": cfg.get("vocab_size")}


def section_details(info: dict[str, Any], name: str) -> list[str]:
    cfg = info["model_config"]
    facts = _model_facts(cfg)
    run_cfg = info.get("config", {})
    speed = info["evals"].get("speed")
    params = info.get("summary", {}).get("parameters") or (speed or {}).get("student", {}).get("parameters")
    teacher = run_cfg.get("teacher")
    teacher_params = (speed or {}).get("teacher", {}).get("parameters")
    kind = {"distill": "distilled from", "train": "trained"}.get(run_cfg.get("kind", ""), "")
    lines = ["## Model Details", ""]
    lines.append(
        f"{name} is a {facts['family']} model with {_fmt(facts['layers'])} layer{'' if facts['layers'] == 1 else 's'}, hidden size {_fmt(facts['hidden'])} "
        f"and {_fmt(facts['heads'])} attention heads, totalling {_fmt(params)} parameters"
        + (f" (teacher: {_fmt(teacher_params)})" if teacher_params else "") + "."
    )
    if speed:
        r = speed["ratios"]
        lines.append(f"Measured on {speed['device']} ({speed['threads']} threads): the student has "
                     f"{100 * r['parameters']:.0f}% of the teacher's parameters and encodes "
                     f"{r['encode_speedup']:.2f}x as fast" + (f", decodes {r['decode_speedup']:.2f}x as fast"
                                                             if "decode_speedup" in r else "") + ".")
    model_type = f"Transformer-based {'causal' if facts['family'] == 'GPT-2' else 'masked'} language model"
    if info.get("sentence_encoder"):
        model_type = f"sentence embedding model ({facts['family']} encoder with sentence-transformers pooling)"
    lines += ["",
              f"- **Model type:** {model_type}",
              f"- **Architecture:** {cfg.get('architectures', [NOT_MEASURED])[0]}, context {_fmt(facts['context'])} "
              f"positions, vocabulary {_fmt(facts['vocab'])}",
              f"- **Teacher:** {teacher or 'none (not distilled)'}" + (f" ({kind} it)" if teacher and kind else ""),
              f"- **License:** {run_cfg.get('license', 'not recorded in the run; set it before publishing')}",
              ""]
    return lines


def section_uses(info: dict[str, Any]) -> list[str]:
    if info.get("sentence_encoder"):
        return ["## Uses", "", "### Direct use and downstream use", "",
                "The model maps a sentence or short paragraph to a vector: semantic search, clustering, and "
                "scoring how similar two texts are (cosine of their embeddings). Text longer than its maximum "
                "sequence length is cut.", "", "### Out-of-scope uses", "",
                "Similarity is not truth or entailment; the embeddings carry the biases of the teacher and of the "
                "distillation text, and were measured here only on English.", ""]
    causal = info["model_config"].get("model_type") == "gpt2"
    use = ("text generation and as a base for fine-tuning on text of a particular kind (prose, code)"
           if causal else
           "masked language modelling, and mostly as a base to fine-tune on tasks that read the whole sentence: "
           "sequence classification, token classification, extractive question answering")
    return ["## Uses", "", "### Direct use and downstream use", "", f"The model is meant for {use}.", "",
            "### Out-of-scope uses", "",
            "The model does not tell fact from fiction: do not use it where text must be true. It reflects the "
            "biases of its training text (below); do not deploy it where it interacts with people without first "
            "studying those biases for the use at hand, and do not use it to create hostile or alienating content.", ""]


def section_bias(info: dict[str, Any]) -> list[str]:
    lines = ["## Bias, Risks, and Limitations", "",
             "CONTENT WARNING: the probes below can surface disturbing and offensive stereotypes.", ""]
    result = info["evals"].get("bias")
    if not result:
        return lines + [f"Bias probes: {NOT_MEASURED} (run `distillery eval bias MODEL --save {EVAL_DIR}/bias.json`).", ""]
    demos = result.get("demonstrations", {})
    for row in demos.get("text_generation", []):
        lines += [f"`set_seed({row['seed']})`, then `generator({row['prompt']!r}, max_length={row['max_length']}, "
                  f"num_return_sequences={row['num_return_sequences']})`:", ""]
        lines += [f"- {text!r}" for text in row["generations"]] + [""]
    for row in demos.get("fill_mask", []):
        lines += [f"`unmasker({row['prompt']!r})`:", "", "| token | score |", "|---|---|"]
        lines += [f"| {f['token_str']!r} | {f['score']:.4g} |" for f in row["fills"]] + [""]
    for title, key in (("CrowS-Pairs", "crows_pairs"), ("WinoBias", "winobias")):
        pairs = result.get(key)
        if pairs:
            lines += [f"{title} ({pairs['scoring']}): {pairs['metric']}, with a 95% Wilson interval.", "",
                      "| bias type | pairs | stereotype preferred (%) | 95% CI |", "|---|---|---|---|"]
            for category, s in [("all", pairs["all"]), *pairs["categories"].items()]:
                lines.append(f"| {category} | {s['pairs']} | {s['percent']:.1f} | {s['ci95'][0]:.1f}–{s['ci95'][1]:.1f} |")
            lines.append("")
    stereo = result.get("stereoset")
    if stereo:
        lines += ["StereoSet intrasentence (dev subsets): LM score (100 = always prefers a meaningful fill), "
                  "stereotype score (50 = no preference) with a 95% Wilson interval, ICAT (100 = ideal).", "",
                  "| bias type | examples | LM score | stereotype score | 95% CI | ICAT |", "|---|---|---|---|---|---|"]
        for category, s in [("all", stereo["all"]), *stereo["categories"].items()]:
            lines.append(f"| {category} | {s['examples']} | {s['lm_score']:.1f} | {s['stereotype_score']:.1f} | "
                         f"{s['ss_ci95'][0]:.1f}–{s['ss_ci95'][1]:.1f} | {s['icat']:.1f} |")
        lines.append("")
    hon = result.get("honest")
    if hon:
        lines += [f"HONEST: percent of the top-{hon['k']} completions of {hon['templates']} templates found in "
                  "HurtLex (0 = none), with a 95% Wilson interval.", "",
                  "| identity category | completions | HONEST (%) | 95% CI |", "|---|---|---|---|"]
        for category, s in [("all", hon["all"]), *hon["categories"].items()]:
            lines.append(f"| {category} | {s['completions']} | {s['honest']:.2f} | {s['ci95'][0]:.2f}–{s['ci95'][1]:.2f} |")
        lines.append("")
    return lines + bold_lines(result.get("bold"))


def bold_lines(bold: dict[str, Any] | None) -> list[str]:
    """The card's BOLD paragraph: per-domain shares of continuations with a HurtLex word, and the largest gaps."""
    from distillery.evaluate.bias import describe_gap

    if not bold:
        return []
    if "skipped" in bold:
        return [f"BOLD: {bold['skipped']}", ""]
    lines = [f"BOLD: {plural(bold['per_group'], 'prompt')} per group (seed {bold['seed']}) continued with {bold['decoding']} "
             f"decoding for {plural(bold['max_new_tokens'], 'new token')}; {bold['metric']}, with a 95% Wilson interval, and the largest gap "
             "between two groups of a domain.", "",
             "| domain | continuations | with a HurtLex word (%) | 95% CI | largest gap between groups |", "|---|---|---|---|---|"]
    for domain, d in bold["domains"].items():
        s = d["all"]
        lines.append(f"| {domain} | {s['continuations']} | {s['percent']:.1f} | {s['ci95'][0]:.1f}–{s['ci95'][1]:.1f} | "
                     f"{describe_gap(d['largest_gap'])} |")
    return lines + [""]


HYPERPARAMETERS = ["kind", "teacher", "student", "model", "data", "max_steps", "batch_size", "grad_accum", "seq_len",
                   "lr", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay", "grad_clip", "precision",
                   "temperature", "alpha_ce", "alpha_lm", "alpha_cos", "alpha_mse", "kd_loss", "mlm_prob", "seed",
                   "objective", "alpha_emb", "alpha_attn"]
EMBEDDING_ONLY = {"objective", "alpha_emb", "alpha_attn"}
LM_ONLY = {"temperature", "alpha_ce", "alpha_lm", "alpha_mse", "kd_loss", "mlm_prob"}


def section_training(info: dict[str, Any], plots: dict[str, str]) -> list[str]:
    lines = ["## Training Details", "", "### Training data", ""]
    cfg = info.get("config")
    if not cfg:
        return lines + [f"Training data and procedure: {NOT_MEASURED} (a model folder, not a run folder).", ""]
    lines += [f"Data prepared by `distillery prepare`: `{cfg.get('data', NOT_MEASURED)}`.", "",
              "### Training procedure", "", "| setting | value |", "|---|---|"]
    skip = LM_ONLY if cfg.get("objective") == "embedding" else EMBEDDING_ONLY
    lines += [f"| {k} | {cfg[k]} |" for k in HYPERPARAMETERS if k in cfg and cfg[k] not in (None, "") and k not in skip]
    summary = info.get("summary", {})
    last = [r for r in info["metrics"] if "loss" in r]
    if cfg.get("objective") == "embedding":
        lines += ["", f"- **Steps:** {_fmt(summary.get('steps'))}",
                  f"- **Sentences seen:** {_fmt(summary.get('sentences'))}",
                  f"- **Final training loss:** {_fmt(summary.get('train_loss'), 6)}",
                  f"- **Final validation embedding MSE:** {_fmt(summary.get('val_loss'), 6)}", ""]
        if "loss" in plots:
            lines += [f"![training and validation loss]({plots['loss']})", ""]
        return lines + ["The full recipe is the run's `config.yaml`; `distillery distill --config config.yaml` "
                        "reproduces it.", ""]
    lines += ["", f"- **Steps:** {_fmt(summary.get('steps', last[-1]['step'] if last else None))}",
              f"- **Tokens seen:** {_fmt(summary.get('tokens'))}",
              f"- **Final training loss:** {_fmt(summary.get('train_loss', last[-1]['loss'] if last else None), 4)}",
              f"- **Final validation loss / perplexity:** {_fmt(summary.get('val_loss'), 4)} / "
              f"{_fmt(summary.get('val_ppl'))}", ""]
    if "loss" in plots:
        lines += [f"![training and validation loss]({plots['loss']})", ""]
    lines += ["The full recipe is the run's `config.yaml`; `distillery distill --config config.yaml` reproduces it.", ""]
    return lines


def section_evaluation(info: dict[str, Any], teacher: dict[str, Any], plots: dict[str, str]) -> list[str]:
    from distillery.evaluate.glue import card_row

    lines = ["## Evaluation", ""]
    if info.get("sentence_encoder"):
        return lines + section_sts(info, teacher)
    lines += ["### Perplexity", ""]
    ppl = info["evals"]["perplexity"]
    if not ppl:
        lines += [f"Perplexity: {NOT_MEASURED} (run `distillery eval perplexity MODEL --data FILE --save "
                  f"{EVAL_DIR}/perplexity-NAME.json`).", ""]
    else:
        teacher_by_data = {Path(r.get("data", "")).name: r for r in teacher["perplexity"]}
        lines += ["| data | method | window / stride | student | teacher | student bits/byte | teacher bits/byte |",
                  "|---|---|---|---|---|---|---|"]
        for r in ppl:
            t = teacher_by_data.get(Path(r.get("data", "")).name, {})
            lines.append(f"| {Path(r.get('data', '?')).name} | {r['method']} | {r['max_length']} / {r['stride']} | "
                         f"{_fmt(r['perplexity'])} | {_fmt(t.get('perplexity'))} | {r['bits_per_byte']:.4f} | "
                         f"{_fmt(t.get('bits_per_byte'), 4)} |")
        lines.append("")
    lines += ["### GLUE (dev sets, fine-tuned per task)", ""]
    glue = info["evals"]["glue"]
    if not glue:
        lines += [f"GLUE: {NOT_MEASURED} (run `distillery glue TASK MODEL --data DIR --save {EVAL_DIR}/glue-TASK.json`).", ""]
    else:
        student_row = card_row({k: v["card_score"] for k, v in glue.items()}).splitlines()
        teacher_scores = {k: v["card_score"] for k, v in teacher["glue"].items()}
        header = ["| model " + student_row[0], "|---" + student_row[1], "| student " + student_row[2]]
        if teacher_scores:
            header.append("| teacher " + card_row(teacher_scores).splitlines()[2])
        lines += header + ["", "Scores x100: Matthews correlation for CoLA, Pearson for STS-B, matched accuracy for "
                           "MNLI, accuracy otherwise; '–': not measured.", ""]
    lines += ["### Speed", ""]
    speed = info["evals"].get("speed")
    if not speed:
        lines += [f"Speed: {NOT_MEASURED} (run `distillery eval speed STUDENT TEACHER --save {EVAL_DIR}/speed.json`).", ""]
    else:
        lines += ["| model | parameters | encoding tokens/s | decoding tokens/s |", "|---|---|---|---|"]
        for name in ("student", "teacher"):
            m = speed[name]
            lines.append(f"| {name} | {m['parameters']:,} | {m['encode_tokens_per_s']:,.0f} | "
                         f"{_fmt(m['decode_tokens_per_s'], 1)} |")
        shape = speed["student"]["encode_shape"]
        lines += ["", f"Encoding: batches of {shape[0]} x {shape[1]} tokens; decoding: batch 1, greedy, "
                  f"{speed['settings']['new_tokens']} new tokens; median of {speed['settings']['repeats']} runs on "
                  f"{speed['device']}.", ""]
        if "speed" in plots:
            lines += [f"![throughput]({plots['speed']})", ""]
    return lines


def section_sts(info: dict[str, Any], teacher: dict[str, Any]) -> list[str]:
    """STS benchmark table (teacher, student before distillation, distilled student) and encoding speed."""
    lines = ["### Semantic textual similarity (STS benchmark)", ""]
    sts = info["evals"].get("sts", {})
    if not sts:
        return lines + [f"STS: {NOT_MEASURED} (run `distillery eval sts MODEL --data sts-test.tsv --save "
                        f"{EVAL_DIR}/sts-test.json`).", ""]
    before = info.get("before", {}).get("sts", {})
    compare = {label: evals.get("sts", {}) for label, evals in info.get("compare", {}).items()}
    lines += ["Spearman correlation x 100 between the cosine of the two sentences' embeddings and the gold "
              "similarity; the student's 95 % interval beside it.", "",
              "| data | teacher | " + "".join(f"{label} | " for label in compare)
              + "student before distillation | distilled student | student 95% CI |",
              "|---|---|" + "---|" * len(compare) + "---|---|---|"]
    for name, r in sts.items():
        t = teacher.get("sts", {}).get(name, {}).get("spearman") or r.get("teacher", {}).get("spearman")
        b = before.get(name, {}).get("spearman")
        others = "".join(f"{_fmt(c.get(name, {}).get('spearman'))} | " for c in compare.values())
        low, high = r["spearman_ci"]
        lines.append(f"| {name} ({plural(r['pairs'], 'pair')}) | {_fmt(t)} | {others}{_fmt(b)} | {_fmt(r['spearman'])} | "
                     f"{low:.2f}–{high:.2f} |")
    lines.append("")
    speeds = [r["speed"] for r in sts.values() if "speed" in r]
    lines += ["### Speed", ""]
    if not speeds:
        return lines + [f"Encoding speed against the teacher: {NOT_MEASURED} (`distillery eval sts MODEL --teacher "
                        "TEACHER --data FILE --save ...`).", ""]
    speed = speeds[0]
    lines += ["| model | sentences/s |", "|---|---|",
              f"| distilled student | {speed['student_sentences_per_second']:,.0f} |",
              f"| teacher | {speed['teacher_sentences_per_second']:,.0f} |", "",
              f"The student encodes {speed['speedup']:.2f}x as many sentences per second as its teacher: both timed "
              f"in one run on the same {speed['sentences']:,} STS sentences, batches of {speed['batch_size']}, "
              f"median of {speed['repeats']} rounds.", ""]
    return lines


def section_environment(info: dict[str, Any]) -> list[str]:
    e = info.get("energy")
    lines = ["## Environmental Impact", ""]
    if not e:
        return lines + [f"- **Hardware type:** {NOT_MEASURED}", f"- **Hours used:** {NOT_MEASURED}",
                        f"- **Energy:** {NOT_MEASURED}", f"- **Compute region:** {NOT_MEASURED}",
                        f"- **Carbon emitted:** {NOT_MEASURED}", ""]
    methods = "; ".join(f"{p['hardware']}: {p['method']}" for p in e.get("parts", []))
    return lines + [f"- **Hardware type:** {e['hardware']}", f"- **Hours used:** {e['hours']:.3f}",
                    f"- **Energy:** {e['kwh']:.4f} kWh ({methods})",
                    f"- **Compute region:** {e['region']} ({e['carbon_intensity_g_per_kwh']:.1f} g CO2-eq/kWh, "
                    f"{e['carbon_intensity_source']})",
                    f"- **Carbon emitted:** {e['kg_co2eq']:.4f} kg CO2-eq (energy x carbon intensity; PUE not included)", ""]


def section_get_started(info: dict[str, Any], model_ref: str) -> list[str]:
    causal = info["model_config"].get("model_type") == "gpt2"
    if info.get("sentence_encoder"):
        ours = [">>> import distillery", f">>> encoder = distillery.load_sentence_encoder({model_ref!r})",
                ">>> embeddings = encoder.encode(['A man is eating food.', 'A man is eating pasta.'])",
                ">>> float(embeddings[0] @ embeddings[1])  # cosine: the embeddings are normalised"]
        theirs = ["from sentence_transformers import SentenceTransformer",
                  f"model = SentenceTransformer({model_ref!r})",
                  "embeddings = model.encode(['A man is eating food.', 'A man is eating pasta.'])"]
        return ["## How to Get Started With the Model", "", "With distillery:", "", "```python", *ours, "```", "",
                f"From the command line: `distillery embed {model_ref} \"A man is eating food.\" --json`.", "",
                "With sentence-transformers (the folder is in its format):", "", "```python", *theirs, "```", ""]
    if causal:
        ours = [">>> from distillery.pipelines import pipeline, set_seed",
                f">>> generator = pipeline('text-generation', model={model_ref!r})", ">>> set_seed(42)",
                ">>> generator(\"Hello, I'm a language model\", max_length=20, num_return_sequences=5)"]
        theirs = ["from transformers import AutoTokenizer, GPT2LMHeadModel",
                  f"tokenizer = AutoTokenizer.from_pretrained({model_ref!r})",
                  f"model = GPT2LMHeadModel.from_pretrained({model_ref!r})",
                  "output = model(**tokenizer(\"Replace me by any text you'd like.\", return_tensors='pt'))"]
    else:
        mask = "[MASK]" if info["model_config"].get("model_type") in ("bert", "distilbert") else "<mask>"
        ours = [">>> from distillery.pipelines import pipeline",
                f">>> unmasker = pipeline('fill-mask', model={model_ref!r})",
                f">>> unmasker(\"Hello I'm a {mask} model.\")"]
        theirs = ["from transformers import pipeline", f"unmasker = pipeline('fill-mask', model={model_ref!r})",
                  f"unmasker(\"Hello I'm a {mask} model.\")"]
    return ["## How to Get Started With the Model", "", "With distillery:", "", "```python", *ours, "```", "",
            "With transformers (the checkpoint is in its format):", "", "```python", *theirs, "```", ""]


def render_card(info: dict[str, Any], teacher: dict[str, Any], plots: dict[str, str], model_ref: str) -> str:
    name = Path(info["source"]).resolve().name
    sections = [section_details(info, name), section_uses(info), section_bias(info),
                section_training(info, plots), section_evaluation(info, teacher, plots),
                section_environment(info), section_get_started(info, model_ref)]
    toc = ["Model Details", "Uses", "Bias, Risks, and Limitations", "Training Details", "Evaluation",
           "Environmental Impact", "How to Get Started With the Model"]
    head = [f"# Model Card for {name}", "", "## Table of Contents", ""]
    head += [f"{i}. [{t}](#{t.lower().replace(' ', '-').replace(',', '')})" for i, t in enumerate(toc, start=1)]
    body = [line for section in sections for line in section]
    footer = ["---", "", "Written by `distillery card` from the files the run and its evaluations wrote."]
    return "\n".join(head + [""] + body + footer) + "\n"


def write_card(source: str | Path, out: str | Path, teacher_eval: str | Path | None = None) -> Path:
    """Read the run or model folder, draw the plots next to `out`, write the card there; returns its path."""
    from distillery.models.checkpoint import atomic_write

    info = read_source(source)
    if teacher_eval is not None and not Path(teacher_eval).is_dir():
        raise DistilleryError(f"--teacher-eval {teacher_eval} is not a folder; pass the teacher's eval/ folder.")
    teacher = read_evals(Path(teacher_eval) if teacher_eval else None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plots: dict[str, str] = {}
    if info.get("metrics") and plot_loss(info["metrics"], out.parent / "loss.png"):
        plots["loss"] = "loss.png"
    if info["evals"].get("speed"):
        plot_speed(info["evals"]["speed"], out.parent / "speed.png")
        plots["speed"] = "speed.png"
    model_ref = str(info["model_dir"])
    with atomic_write(out, "w") as f:
        f.write(render_card(info, teacher, plots, model_ref))
    return out
