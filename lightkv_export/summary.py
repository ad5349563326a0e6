"""The end-of-build summary: schedule, vision tokens per layer group, KV bytes vanilla vs LightKV, parity, paths."""

from __future__ import annotations

from rich.table import Table

from lightkv_export.pipeline import BuildResult


def layer_groups(result: BuildResult) -> list[tuple[int, int]]:
    n = len(result.reference.kv_lengths)
    return result.schedule.layer_groups() if result.schedule is not None and result.schedule.stages else [(1, n)]


def print_summary(result: BuildResult, console) -> None:
    ref = result.reference
    cfg = result.config
    title = "vanilla (no LightKV)" if result.schedule is None else f"schedule {result.schedule.describe()}"
    console.print(f"[bold]{cfg.model}[/]: {title}")

    groups = Table(title=f"reference request ({ref.seq_len} tokens, {ref.vision_tokens} of them vision)")
    groups.add_column("layers")
    groups.add_column("vision tokens", justify="right")
    groups.add_column("KV bytes / layer", justify="right")
    for first, last in layer_groups(result):
        groups.add_row(
            f"{first}-{last}",
            f"{ref.vision_tokens_per_layer[first - 1]} / {ref.vision_tokens}",
            f"{ref.kv_bytes_per_layer[first - 1]:,}",
        )
    console.print(groups)
    light, vanilla = sum(ref.kv_bytes_per_layer), sum(ref.kv_bytes_vanilla_per_layer)
    console.print(f"KV cache per request: {light:,} bytes vs vanilla {vanilla:,} ({light / vanilla:.1%})")

    engines = Table(title="engines")
    engines.add_column("target")
    engines.add_column("parity")
    engines.add_column("path")
    for target in cfg.targets:
        if target in result.failed_targets:
            engines.add_row(target, "[red]not built[/]", str(result.failed_targets[target]))
            continue
        report = result.parity.get(target)
        verdict = "skipped" if report is None else ("[green]pass[/]" if report.passed else "[red]FAIL[/]")
        engines.add_row(target, verdict, str(result.engine_dirs[target]))
    console.print(engines)
    for target, report in result.parity.items():
        for line in report.failure_lines():
            console.print(f"[red]{target}: {line}[/]")
    if result.triton_repo is not None:
        console.print(f"Triton model repository: {result.triton_repo}")
