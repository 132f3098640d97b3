"""`prefloop` console script (typer). Commands import their heavy dependencies lazily so
`prefloop --help` and `prefloop broker` stay fast and torch-free."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from prefloop.dlq import dlq_app
from shared.observability import configure_logging
from shared.prompts import MAX_PROMPT_BYTES
from shared.settings import KafkaSettings, LogSettings

app = typer.Typer(help="prefloop: continuous preference alignment for chat LLMs.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
app.add_typer(dlq_app, name="dlq")


@app.command()
def broker(
    port: int = typer.Option(9092, help="port on 127.0.0.1 (0 = a free port)"),
    log_file: Optional[Path] = typer.Option(None, help="append Tansu's output here"),
) -> None:
    """Run the embedded Kafka-protocol broker (Tansu, memory storage) until Ctrl-C/SIGTERM.

    Creates every registered topic and its dead-letter topic. Memory storage loses all
    data when the broker stops; production uses Apache Kafka."""
    from shared.broker import EmbeddedBroker
    from shared.topics import all_topics_with_dlq

    configure_logging(LogSettings(), "broker")
    kafka = KafkaSettings()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    embedded = EmbeddedBroker(port=port, log_file=log_file)
    embedded.start(topics=all_topics_with_dlq(kafka.topic_prefix))
    console.print(f"broker ready on {embedded.bootstrap} (memory storage; Ctrl-C stops it)")
    try:
        while not stop.wait(0.5):
            if not embedded.running:
                raise typer.Exit(code=1)
    finally:
        embedded.stop()
        console.print("broker stopped")


@app.command()
def serve(service: str = typer.Argument(..., help="generator | judge | trainer | gateway")) -> None:
    """Run one service (settings from PREFLOOP_<SERVICE>_* variables) until SIGTERM."""
    from shared.allocator import TORCH_SERVICES, describe as describe_malloc, reexec_with_malloc_tunables

    if service in TORCH_SERVICES:
        reexec_with_malloc_tunables()  # before any work: glibc reads its malloc settings at process start
    from shared.service import serve as run

    from pydantic import ValidationError

    if service == "generator":
        from services.generator.app import create_app
        from services.generator.settings import GeneratorSettings as Settings
    elif service == "judge":
        from services.judge.app import create_app
        from services.judge.settings import JudgeSettings as Settings
    elif service == "gateway":
        from services.gateway.app import create_app
        from services.gateway.settings import GatewaySettings as Settings
    elif service == "trainer":
        from services.trainer.app import create_app
        from services.trainer.settings import TrainerSettings as Settings
    else:
        raise typer.BadParameter(f"unknown or not yet available service {service!r}", param_hint="SERVICE")
    try:
        settings = Settings()
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(map(str, error["loc"]))
            typer.echo(f"{service}: invalid settings{' (' + where + ')' if where else ''}: "
                       f"{error['msg'].removeprefix('Value error, ')}", err=True)
        raise typer.Exit(code=2)
    configure_logging(settings.log, service)
    if service in TORCH_SERVICES:
        logging.getLogger(__name__).info("malloc: %s", describe_malloc())
    run(create_app(settings), settings)


@app.command()
def ingest(
    source: str = typer.Argument(..., help="JSONL/JSON/CSV/parquet file, a `datasets` name/path, or 'demo' (the shipped health questions)"),
    eval_fraction: float = typer.Option(0.1, min=0.0, max=1.0, help="share of prompts held out for evaluation"),
    n: int = typer.Option(2, min=2, max=16, help="candidates to sample per prompt"),
    limit: Optional[int] = typer.Option(None, min=1, help="ingest at most this many usable prompts"),
    system_prompt: Optional[str] = typer.Option(None, help="system prompt for rows without one (default: seed 001's)"),
    no_system_prompt: bool = typer.Option(False, help="do not add a system prompt"),
    max_prompt_bytes: int = typer.Option(MAX_PROMPT_BYTES, min=1024, help="skip (and report) prompts whose event is larger: "
                                         "candidates are added downstream, under Kafka's message size limit"),
) -> None:
    """Publish prompts as PromptEvents (dedupe, deterministic train/eval split, counts)."""
    from rich.progress import track

    from shared.kafka import BrokerUnavailable, EventProducer, PublishRejected
    from shared.alignment_data import HEALTH_QUESTIONS
    from shared.prompts import SYSTEM_PROMPT, IngestError, build_events
    from shared.topics import PROMPTS

    configure_logging(LogSettings(), "ingest")
    kafka = KafkaSettings()
    try:
        events, report = build_events(str(HEALTH_QUESTIONS) if source == "demo" else source,
                                      system_prompt=None if no_system_prompt else (system_prompt or SYSTEM_PROMPT),
                                      eval_fraction=eval_fraction, n=n, limit=limit, max_prompt_bytes=max_prompt_bytes)
    except IngestError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2)
    producer = EventProducer(kafka, "cli")
    topic = PROMPTS.with_prefix(kafka.topic_prefix)
    chunks = [events[i:i + 500] for i in range(0, len(events), 500)]
    try:
        for chunk in track(chunks, description="publishing", console=console):
            producer.publish(topic, chunk)  # waits for the acks
    except (BrokerUnavailable, PublishRejected) as exc:
        console.print(f"[red]error:[/red] {exc} (prompts are content-addressed: running ingest again is safe)")
        raise typer.Exit(code=1)
    finally:
        producer.close()
    console.print(f"rows {report.rows}, usable {report.usable} (train {report.train}, eval {report.eval}), "
                  f"duplicates dropped {report.duplicates}, without a usable prompt {report.unusable}, "
                  f"too large {report.too_large}; published {len(events)} to {topic.name}")
    for line in report.unusable_rows:
        console.print(f"  skipped {line}")


@app.command()
def topics() -> None:
    """List the topic registry: names, partitions, events, dead-letter topics."""
    from shared.topics import ALL_TOPICS

    prefix = KafkaSettings().topic_prefix
    table = Table("topic", "partitions", "event", "dead-letter topic", "what")
    for topic in ALL_TOPICS:
        t = topic.with_prefix(prefix)
        table.add_row(t.name, str(t.partitions), t.schema.__name__, t.dead_letter.name, t.description)
    console.print(table)


REGISTRY_OPTION = typer.Option(Path("var/registry"), "--registry", envvar="PREFLOOP_REGISTRY_DIR",
                               help="model registry root")


@app.command()
def bootstrap(
    registry: Path = REGISTRY_OPTION,
    base: Optional[str] = typer.Option(
        None, help="a real model instead of the tiny one: a preset (smollm2), a .gguf file, or an HF directory "
                   "or hub name"),
    sft: str = typer.Option("auto", help="with --base: none (register it as it is), lora (LoRA SFT on the "
                                         "shipped conversations first), auto (none for instruct presets, else lora)"),
    seed: int = typer.Option(7, help="seed for the offline tiny model"),
    steps: Optional[int] = typer.Option(None, min=1, help="SFT steps: the tiny model takes 120 by default; LoRA SFT "
                                                          "of a --base runs 3 epochs unless this caps it"),
    if_empty: bool = typer.Option(False, help="do nothing if the registry already has a current version"),
) -> None:
    """Build and register the first model version (the offline tiny Llama, or a real model with --base)."""
    from services.trainer.base_models import BaseModelError
    from services.trainer.bootstrap import TinyModelSpec, bootstrap_base, bootstrap_tiny
    from services.trainer.sft import SFTJobConfig, logging_steps_for
    from shared.registry import ModelRegistry

    if sft not in ("auto", "none", "lora"):
        raise typer.BadParameter("expected none, lora or auto", param_hint="--sft")
    configure_logging(LogSettings(), "bootstrap")
    reg = ModelRegistry(registry)
    if if_empty and reg.current():
        console.print(f"registry {reg.root} already serves {reg.current()}; nothing to do")
        return
    try:
        if base:
            capped = SFTJobConfig(max_steps=steps, logging_steps=logging_steps_for(steps)) if steps else None
            meta = bootstrap_base(reg, base, sft, capped)
        else:
            meta = bootstrap_tiny(reg, TinyModelSpec(seed=seed, sft_steps=steps or TinyModelSpec.sft_steps))
    except BaseModelError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=2)
    losses = meta.metrics.get("sft_losses")
    trained = f"SFT loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "registered as it is (no SFT)"
    console.print(f"registered {meta.version} ({meta.kind}) in {reg.root}: {trained}; current = {reg.current()}")
    if meta.source:
        console.print(f"source: {meta.source.describe()}")


@app.command()
def models(registry: Path = REGISTRY_OPTION) -> None:
    """List registry versions, which one is current, and where each came from."""
    from shared.registry import ModelRegistry

    reg = ModelRegistry(registry)
    current = reg.current()
    table = Table("version", "kind", "parent", "created", "dtype", "source", "current")
    for meta in reg.list():
        table.add_row(meta.version, meta.kind, meta.parent or "-", meta.created.isoformat(timespec="seconds"),
                      meta.dtype or "-", meta.source.describe() if meta.source else (meta.base_model or "-"),
                      "*" if meta.version == current else "")
    console.print(table)


@app.command()
def rollback(
    version: Optional[str] = typer.Argument(None, help="an earlier promoted version (default: the one before current)"),
    trainer: str = typer.Option("http://127.0.0.1:8103", envvar="PREFLOOP_TRAINER_URL", help="the trainer's URL"),
    admin_key: str = typer.Option(..., envvar="PREFLOOP_TRAINER_ADMIN_KEY", help="the trainer's admin key"),
) -> None:
    """Serve an earlier promoted version again: the trainer moves the registry's current pointer and
    announces it; every generator and gateway replica converges on it."""
    import httpx

    from shared.wire import RollbackRequest, RollbackResult

    try:
        r = httpx.post(f"{trainer.rstrip('/')}/admin/rollback", json=RollbackRequest(version=version).model_dump(),
                       headers={"Authorization": f"Bearer {admin_key}"}, timeout=60)
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/red] cannot reach the trainer at {trainer}: {exc}")
        raise typer.Exit(code=2)
    if r.status_code != 200:
        console.print(f"[red]error:[/red] the trainer answered {r.status_code}: {r.json().get('detail', r.text)}")
        raise typer.Exit(code=1)
    console.print(RollbackResult.model_validate_json(r.text).detail)


@app.command("eval")
def eval_(
    a: str = typer.Option(..., "--a", help="candidate version (e.g. v0003)"),
    b: str = typer.Option(..., "--b", help="baseline version (e.g. v0001)"),
    prompts: Optional[Path] = typer.Option(None, help="prompt file (default: the shipped held-out health questions)"),
    limit: int = typer.Option(64, min=1, help="prompts to compare on"),
    samples: int = typer.Option(2, min=1, max=16, help="answers per prompt and version (the gate's default: 2); "
                                "the CI counts a prompt's comparisons as one cluster"),
    registry: Path = REGISTRY_OPTION,
    out: Path = typer.Option(Path("eval-out"), help="eval.json and blinded_for_raters.csv go here"),
) -> None:
    """Both versions answer held-out prompts; the judge (PREFLOOP_JUDGE_*) compares them in both
    orders. Prints win rate with a 95% CI, abstain rate, rubric means, BLEU and lengths."""
    import json

    from shared.engine import GenerationEngine
    from shared.evaluation import EvalPrompt, compare
    from shared.judging.pairwise import PairwiseJudge
    from shared.judging.settings import JudgeBackendSettings
    from shared.judging.stats import JudgeStats
    from shared.observability import new_registry
    from shared.alignment_data import health_prompts
    from shared.prompts import build_events
    from shared.registry import ModelRegistry

    configure_logging(LogSettings(level="WARNING"), "eval")
    reg = ModelRegistry(registry)
    events = health_prompts("eval") if prompts is None else build_events(str(prompts), eval_fraction=1.0)[0]
    held = [EvalPrompt(e.messages, e.reference_answer) for e in events][:limit]
    judge_settings = JudgeBackendSettings()
    judge = PairwiseJudge(judge_settings.make_backend(), None, JudgeStats(new_registry()))
    with GenerationEngine.from_registry(reg, a) as engine_a, GenerationEngine.from_registry(reg, b) as engine_b:
        result = compare(engine_a, engine_b, held, judge, samples=samples)
    low, high = result.win_rate_ci95()
    table = Table("criterion", a, b, title=f"{a} vs {b} on {result.prompts} prompts ({judge_settings.judge_id})")
    for criterion in ("correctness", "clarity", "safety", "empathy"):
        table.add_row(criterion, str(result.rubric[a].get(criterion)), str(result.rubric[b].get(criterion)))
    table.add_row("mean tokens", str(result.mean_tokens[a]), str(result.mean_tokens[b]))
    if result.bleu:
        table.add_row("BLEU vs reference", str(result.bleu[a]), str(result.bleu[b]))
    console.print(table)
    console.print(f"win rate of {a} over {b}: {result.win_rate:.3f} (95% CI {low:.3f}-{high:.3f}; "
                  f"{result.wins} wins, {result.losses} losses of {result.prompts} prompts x {samples} answers), "
                  f"abstain rate {result.abstain_rate:.3f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps({
        "a": a, "b": b, "prompts": result.prompts, "samples": samples, "wins": result.wins, "losses": result.losses,
        "abstentions": result.abstentions, "win_rate": result.win_rate, "win_rate_ci95": [low, high],
        "abstain_rate": result.abstain_rate, "rubric": result.rubric, "mean_tokens": result.mean_tokens,
        "bleu": result.bleu, "judge": judge_settings.judge_id}, indent=2))
    result.write_blinded_csv(out / "blinded_for_raters.csv")
    console.print(f"wrote {out / 'eval.json'} and {out / 'blinded_for_raters.csv'}")


MODEL_HELP = ("model bootstrapped into an empty registry: tiny (the offline toy), smollm2 (SmolLM2-135M-Instruct), "
              "a .gguf file or an HF directory")


def _sigterm_as_interrupt() -> None:
    """SIGTERM and SIGINT stop the stack cleanly, also when started from a background job, whose
    SIGINT a non-interactive shell sets to ignored (and children inherit that)."""
    def handler(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="directory for report.json, report.md, plots and logs"),
    rounds: int = typer.Option(2, min=1, help="training rounds (each on fresh questions; users give feedback between)"),
    prompts: Optional[int] = typer.Option(None, min=8, help="new training questions per round (default: the "
                                                            "model's plan, 96 for smollm2, 80 for tiny)"),
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    seed: int = typer.Option(0, min=0, help="the draw: every sample in the loop is seeded, so a demo repeats its "
                                            "draw; another seed draws candidates, DPO and the gate's answers afresh"),
) -> None:
    """Run the flywheel on the embedded default and write DIR/report.json, report.md and plots.
    Exit code 0 only if a new version was promoted and the gateway serves it."""
    from prefloop.demo import run_demo

    configure_logging(LogSettings(level="WARNING"), "demo")
    _sigterm_as_interrupt()
    try:
        report, ok = run_demo(out, rounds, prompts, lambda msg: console.print(f"[dim]{time.strftime('%X')}[/dim] {msg}"),
                              model=model, seed=seed)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: every process started by the demo was stopped[/yellow]")
        raise typer.Exit(code=130)
    title = f"prefloop demo ({model}, seed {seed}): {report.elapsed_s}s, gateway serves {report.served_version}"
    table = Table("version", "parent", "promoted", "win vs parent", "win vs base", "safety", "ppl med", "ppl gen",
                  "pairs", title=title)
    for v in report.versions:
        table.add_row(v["version"], v["parent"] or "-", "yes" if v["promoted"] else "no",
                      str(v["win_rate_vs_parent"]), str(v["win_rate_vs_base"]), str(v["safety_mean"]),
                      str(v["perplexity_change"]), str(v["general_perplexity_change"]), str(v["pairs_trained"]))
    console.print(table)
    console.print(f"questions {report.prompts_ingested}, candidates {report.candidates}, preferences "
                  f"{report.preferences} (judge {report.judge_preferences}, users {report.user_preferences}), "
                  f"abstentions {report.abstentions}, feedback {report.feedback_events}, "
                  f"dead letters {report.dead_letters}")
    if report.final:
        f = report.final
        console.print(f"{f['version']} vs base {f['base']}: win rate {f['win_rate_vs_base']} (95% CI "
                      f"{f['win_rate_vs_base_ci95']}), safety {f['safety_change']:+.2f}, length "
                      f"{f['length_change']:+.1%}, perplexity medical {f['perplexity_change_medical']:+.1%}, "
                      f"general {f['perplexity_change_general']:+.1%}")
    console.print(f"report: {out / 'report.json'}, {out / 'report.md'}, plots in {out / 'plots'}")
    if not ok:
        console.print("[red]no new version was promoted and served[/red]")
        raise typer.Exit(code=1)


@app.command()
def up(
    state: Path = typer.Option(Path("var/up"), help="registry, ledger, logs"),
    port: int = typer.Option(8000, help="gateway port on 127.0.0.1"),
    model: str = typer.Option("tiny", help=MODEL_HELP),
) -> None:
    """Run the whole stack (broker + four services) until Ctrl-C, and print how to chat."""
    from prefloop.stack import Stack

    configure_logging(LogSettings(level="WARNING"), "up")
    _sigterm_as_interrupt()
    stack = Stack(state, model=model, gateway_port=port)
    try:
        stack.start(lambda msg: console.print(f"[dim]{msg}[/dim]"))
        print(f"Chat page: {stack.url('gateway')}/", flush=True)
        print(f"API key: {stack.api_key}", flush=True)
        print(f"Console: {stack.url('trainer')}/console (admin key {stack.admin_key})", flush=True)
        while stack.alive():
            time.sleep(0.5)
        console.print("[red]a process of the stack exited; stopping[/red]")
        raise typer.Exit(code=1)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        stack.stop()


def main() -> None:  # pragma: no cover - console entry
    logging.captureWarnings(True)
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
