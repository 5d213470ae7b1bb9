"""`datablame verify` (tabular models and language models) and `datablame finetune`.

`verify` tells the two apart by the model: a file is a tabular model (retrained with its
own settings: LDS, remove-top-k, leave-one-out), a directory is a Hugging Face base model
whose `--adapter` is re-fine-tuned with its recipe without the blamed rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from datablame.cli.console import console, fail
from datablame.cli.report import HTML_HELP, check_html, write_report
from datablame.cli.tabular import parse_rows, print_verify, run_verify
from datablame.errors import check_at_least
from datablame.methods.families import methods_help

TEXT = "Language models"


def verify(
    train_file: Annotated[Path, typer.Argument(help="Training rows (.csv/.parquet for a "
                                                    "tabular model, .jsonl/.json/.csv for "
                                                    "an LM).")],
    model: Annotated[Path, typer.Option(help="A tabular model file (as for 'tabular'; "
                                             "torch needs its training settings in the "
                                             ".json), or a base LM directory.")],
    target: Annotated[str, typer.Option(help="Target column (tabular).")] = "",
    query: Annotated[Optional[Path], typer.Option(help="Tabular: query rows (their target "  # noqa: UP045
                                                       "column is used). LM: a .json query "
                                                       "(prompt fields + answer) or text.")
                     ] = None,
    method: Annotated[str, typer.Option(help="Method whose scores are checked; auto = the "
                                             "family's default. Fits: " + methods_help() + ".")
                      ] = "auto",
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow a .pkl/.joblib "
                                               "model.")] = False,
    lds_subsets: Annotated[Optional[int], typer.Option(  # noqa: UP045
        help="Random 50% subsets for LDS (0: skip; default 50 for a tabular model, 0 for an "
             "LM: each subset is one fine-tune; an LM needs a --trace of every row's "
             "scores: trace --all-rows --top-k N).", show_default=False)] = None,
    remove_top_k: Annotated[int, typer.Option(help="k for remove-top-k vs random-k (0: "
                                                   "skip). LM with --trace: remove the "
                                                   "trace's top k.")] = 10,
    loo: Annotated[str, typer.Option(help="Comma-separated rows for leave-one-out.")] = "",
    out: Annotated[Path, typer.Option(help="JSON results file (new, or one verify wrote).")
                   ] = Path("verify.json"),
    cache: Annotated[Optional[Path], typer.Option(help="Keep retrainings here so an "  # noqa: UP045
                                                       "interrupted run resumes.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="The PEFT adapter the trace "  # noqa: UP045
                                                         "explained.", rich_help_panel=TEXT)
                       ] = None,
    trace: Annotated[Optional[Path], typer.Option(help="A 'trace --out' results file: its "  # noqa: UP045
                                                       "query, and its top --remove-top-k "
                                                       "rows to remove.",
                                                  rich_help_panel=TEXT)] = None,
    remove: Annotated[str, typer.Option(help="Comma-separated rows to remove (instead of a "
                                             "trace's top k).", rich_help_panel=TEXT)] = "",
    random: Annotated[int, typer.Option(help="Random removals of as many rows to compare "
                                             "with.", rich_help_panel=TEXT)] = 3,
    recipe: Annotated[Optional[Path], typer.Option(help="How the adapter was fine-tuned "  # noqa: UP045
                                                        "(YAML/JSON; default: the recipe "
                                                        "'finetune' saved in it).",
                                                   rich_help_panel=TEXT)] = None,
    field: Annotated[list[str], typer.Option(help="Prompt field of the query, NAME=VALUE.",
                                             rich_help_panel=TEXT)] = [],  # noqa: B006
    same_schedule: Annotated[bool, typer.Option(
        "--same-schedule", help="Re-fine-tune with the removed rows at weight 0 in the full "
        "run's batches: the single-model counterfactual MAGIC predicts (default: the kept "
        "rows re-batched, as retraining on less data does).", rich_help_panel=TEXT)] = False,
    lds_keep: Annotated[float, typer.Option(help="Share of the rows each LDS retraining "
                                                 "keeps (MAGIC's protocol: 0.98 with "
                                                 "--same-schedule).",
                                            rich_help_panel=TEXT)] = 0.5,
    html: Annotated[Optional[Path], typer.Option(help=HTML_HELP)] = None,  # noqa: UP045
) -> None:
    """Check an attribution against retraining. Tabular: LDS, remove-top-k, leave-one-out.
    LM: re-fine-tune without the blamed rows and without random rows; does the model still
    say it?"""
    check_html(html)
    if model.is_dir():
        _verify_text(train_file, model, adapter, query, trace, remove, remove_top_k, random,
                     recipe, field, out, cache, lds_subsets or 0, html, same_schedule,
                     lds_keep)
        return
    if same_schedule or lds_keep != 0.5:
        fail("--same-schedule and --lds-keep are for a language model (a base model "
             "directory and --adapter)")
    lds_subsets = 50 if lds_subsets is None else lds_subsets
    if not target:
        fail("--target is required for a tabular model (the target column)")
    if query is None:
        fail("--query is required for a tabular model (query rows with the target column)")
    result = run_verify(train_file, target, model, query, method=method,
                        lds_subsets=lds_subsets, remove_k=remove_top_k,
                        loo_rows=parse_rows(loo), out=out, cache=cache,
                        trust_pickle=trust_pickle)
    print_verify(result, out)
    write_report(html, result)


def _verify_text(train_file, model, adapter, query_file, trace, remove, top_k, n_random,
                 recipe_file, fields, out, cache, lds_subsets, html=None,
                 same_schedule: bool = False, lds_keep: float = 0.5) -> None:
    from datablame.cli.main import _parse_fields
    from datablame.outputs import (
        check_output_dir,
        check_output_file,
        is_json_with,
        write_json_output,
    )
    from datablame.text_verify import (
        lds_text,
        resolve_recipe,
        rows_from_trace,
        scores_from_trace,
        signed_scores_from_trace,
        verify_text,
    )

    check_output_file(out, "--out", ours=is_json_with("runs", "verdict"))
    if cache:
        check_output_dir(cache, "--cache")
    if adapter is None:
        fail("--adapter is required to verify a language model (the adapter to re-fine-tune)")
    if not train_file.exists():
        fail(f"training file not found: {train_file}")
    if bool(remove) == bool(trace):
        fail("give the rows to remove with exactly one of --remove or --trace")
    check_at_least("--remove-top-k", top_k, 1)
    check_at_least("--random", n_random, 1)
    check_at_least("--lds-subsets", lds_subsets, 0)
    if lds_subsets and trace is None:
        fail("LDS needs every row's score for the query: give a --trace results file "
             "(trace --all-rows --top-k <rows>)")
    recipe, _ = resolve_recipe(adapter, recipe_file)  # before any row is read
    template = recipe.prompt_template(model)
    prompt = _parse_fields(fields, template)
    rows = rows_from_trace(trace, top_k) if trace is not None else \
        parse_rows(remove, "--remove")
    the_query = text_query(trace, query_file, prompt, template, "the query")
    result = verify_text(train_file, model, adapter, the_query, remove=rows,
                         n_random=n_random, recipe_file=recipe_file, cache=cache,
                         same_schedule=same_schedule)
    if lds_subsets:
        n = result["n_train"]
        scores, key, listed = scores_from_trace(trace, n)
        if listed < n:
            console.print(f"note: the trace lists {listed} of {n} rows; the others count as "
                          f"0 (trace --all-rows --top-k {n} scores every row)", highlight=False)
        signed = signed_scores_from_trace(trace, n)
        result["lds"] = {"scored_by": key, "rows_listed": listed, **lds_text(
            train_file, model, adapter, the_query, scores, n_subsets=lds_subsets,
            recipe_file=recipe_file, cache=cache, keep_fraction=lds_keep,
            same_schedule=same_schedule, also=None if signed is None else {"score": signed})}
    write_json_output(out, result)
    for name, run in [("original adapter", result["original"]),
                      *((n, r) for n, r in result["runs"].items())]:
        console.print(f"{name:>18}: loss {run['loss']:.3f}, says "
                      f"{'yes' if run['says'] else 'no '}: {run['generation'][:80]!r}",
                      highlight=False, soft_wrap=True)
    console.print(result["summary"], highlight=False, soft_wrap=True)
    if "lds" in result:
        lds = result["lds"]
        console.print(f"LDS over {lds['subsets']} random subsets keeping "
                      f"{lds['kept_fraction']:.0%} of the rows, {lds['retraining']} "
                      f"(trace's '{lds['scored_by']}' "
                      f"column vs re-fine-tuned query loss): {lds['lds']:.2f} (95% CI "
                      f"{lds['ci95'][0]:.2f} to {lds['ci95'][1]:.2f})", highlight=False,
                      soft_wrap=True)
        for column, other in lds.get("by_column", {}).items():
            console.print(f"  by the trace's '{column}' column (its signed estimate) on the "
                          f"same retrainings: {other['lds']:.2f} (95% CI {other['ci95'][0]:.2f}"
                          f" to {other['ci95'][1]:.2f})", highlight=False, soft_wrap=True)
    console.print(f"results written to {out}", highlight=False)
    write_report(html, result)


def finetune(
    train_file: Annotated[Path, typer.Argument(help="Training rows: .jsonl, .json, .csv or "
                                                    ".parquet.")],
    model: Annotated[Path, typer.Option(help="Base model directory (from_pretrained).")],
    out: Annotated[Path, typer.Option(help="Adapter directory to write (new, empty, or one "
                                           "finetune wrote).")],
    recipe: Annotated[Optional[Path], typer.Option(help="Recipe (YAML/JSON): LoRA rank, "  # noqa: UP045
                                                        "alpha, target modules, dropout, lr, "
                                                        "schedule, epochs, batch size, seed, "
                                                        "template, ...")] = None,
) -> None:
    """LoRA-fine-tune a base model reproducibly: the same recipe and rows give the same
    adapter; the recipe is saved with it, so 'verify' can retrain without rows."""
    from datablame.data.rows import load_rows
    from datablame.models.lora_finetune import Recipe, check_out_dir
    from datablame.models.lora_finetune import finetune as run_finetune

    the_recipe = Recipe.from_file(recipe) if recipe is not None else Recipe()
    check_out_dir(out)
    if not train_file.exists():
        fail(f"training file not found: {train_file}")
    if not (model / "config.json").is_file():
        fail(f"{model} is not a Hugging Face model directory (no config.json)")
    summary = run_finetune(load_rows(train_file), model, out, the_recipe)
    console.print(f"fine-tuned {summary['rows_kept']} rows x {the_recipe.epochs} epochs "
                  f"({summary['steps']} steps, final batch loss {summary['final_loss']:.4f}) "
                  f"-> {out}", highlight=False, soft_wrap=True)


def fix(
    train_file: Annotated[Path, typer.Argument(help="Training rows (as for 'verify').")],
    model: Annotated[Path, typer.Option(help="A tabular model file, or a base LM directory.")],
    remove: Annotated[str, typer.Option(help="Comma-separated rows to remove.")] = "",
    trace: Annotated[Optional[Path], typer.Option(help="A results file (trace / tabular "  # noqa: UP045
                                                       "--json / --out): remove its top "
                                                       "--top-k rows (each query's).")
                     ] = None,
    top_k: Annotated[int, typer.Option(help="With --trace: how many of its top rows.")] = 1,
    query: Annotated[Optional[Path], typer.Option(help="LM: a .json query (prompt fields + "  # noqa: UP045
                                                       "answer) or text, if the trace does "
                                                       "not hold it. Tabular: query rows.")
                     ] = None,
    field: Annotated[list[str], typer.Option(help="LM: prompt field of the query, "
                                                  "NAME=VALUE.")] = [],  # noqa: B006
    adapter: Annotated[Optional[Path], typer.Option(help="LM: the PEFT adapter that says "  # noqa: UP045
                                                         "the wrong thing.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="LM: the fixed adapter's directory "  # noqa: UP045
                                                     "(new or empty).")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="LM: how the adapter was "  # noqa: UP045
                                                        "fine-tuned (default: its saved "
                                                        "recipe).")] = None,
    target: Annotated[str, typer.Option(help="Tabular: target column.")] = "",
    random: Annotated[int, typer.Option(help="Tabular: random removals of as many rows to "
                                             "compare with.")] = 3,
    trust_pickle: Annotated[bool, typer.Option("--trust-pickle", help="Allow a .pkl/.joblib "
                                               "model.")] = False,
    kept: Annotated[Optional[Path], typer.Option(help="Write the training rows that stay, in "  # noqa: UP045
                                                      "the training file's format.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    result_file: Annotated[Optional[Path], typer.Option("--result", help="Write the JSON "  # noqa: UP045
                                                        "result here.")] = None,
    html: Annotated[Optional[Path], typer.Option(help=HTML_HELP)] = None,  # noqa: UP045
) -> None:
    """Wrong facts, fixed: retrain without the blamed rows, show before and after.

    A language model is re-fine-tuned with its recipe into a new adapter (--out) and the
    answer generated again; a tabular model is retrained and each query row's prediction
    shown next to retraining on every row and without random rows."""
    from datablame.outputs import (
        check_output_file,
        is_json_with,
        write_json_output,
        write_training_rows,
    )

    if not train_file.exists():
        fail(f"training file not found: {train_file}")
    if bool(remove) == bool(trace):
        fail("give the rows to remove with exactly one of --remove or --trace")
    check_at_least("--top-k", top_k, 1)
    suffix = train_file.suffix.lower()
    if kept is not None:
        check_output_file(kept, "--kept", suffix=suffix, ours=lambda p: False,
                          what=" (the training file's format)")
    if result_file is not None:
        check_output_file(result_file, "--result", ours=is_json_with("removed", "summary"))
    check_html(html)
    rows = parse_rows(remove, "--remove") if remove else _rows_of(trace, top_k)
    if model.is_dir():
        result = _fix_text(train_file, model, adapter, out, trace, query, field, recipe,
                           rows)
    else:
        if out is not None or adapter is not None:
            fail("--out and --adapter are for a language model; a tabular fix reports the "
                 "predictions (--kept writes the rows to retrain on)")
        if not target or query is None:
            fail("a tabular model needs --target and --query (the rows it got wrong)")
        result = _fix_tabular(train_file, target, model, query, rows, random, trust_pickle)
    if kept is not None:
        gone = set(result["removed"])
        write_training_rows(train_file, kept, [i for i in range(result["n_train"])
                                               if i not in gone])
    if result_file is not None:
        write_json_output(result_file, result)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_fix(result)
    write_report(html, json.loads(json.dumps(result, default=str)))


def _rows_of(results_file: Path, top_k: int) -> list[int]:
    """The top-k rows of a trace (or of each query of a tabular result)."""
    from datablame.text_verify import _trace_results, rows_from_trace

    ranked = _trace_results(results_file)
    if any("query" in r and isinstance(r["query"], int) for r in ranked):
        return sorted({int(r["row"]) for r in ranked if int(r.get("rank", 1)) <= top_k})
    return rows_from_trace(results_file, top_k)


def _fix_text(train_file, model, adapter, out, trace, query_file, fields, recipe_file,
              rows) -> dict:
    from datablame.cli.main import _parse_fields
    from datablame.models.lora_finetune import check_out_dir
    from datablame.text_verify import fix_text, resolve_recipe

    if adapter is None or out is None:
        fail("a language model fix needs --adapter (the one that says it) and --out (the "
             "fixed adapter's directory)")
    check_out_dir(out)
    recipe, _ = resolve_recipe(adapter, recipe_file)
    template = recipe.prompt_template(model)
    the_query = text_query(trace, query_file, _parse_fields(fields, template), template,
                           "the wrong answer")
    return fix_text(train_file, model, adapter, the_query, remove=rows, out_dir=out,
                    recipe_file=recipe_file)


def text_query(trace, query_file, prompt: dict, template, what: str):
    """The query a text verify or fix is about: a --query file (with --field prompt
    fields), else the one a --trace results file holds; checked against the template."""
    from datablame.cli.main import _read_query_file
    from datablame.text import Query

    the_query = None
    if trace is not None:
        saved = json.loads(trace.read_text())
        if isinstance(saved, dict) and saved.get("query") is not None:
            the_query = Query(str(saved["query"]), {k: v if isinstance(v, list) else str(v)
                                                   for k, v in
                                                   (saved.get("prompt") or {}).items()},
                              saved.get("focus") or None)
    if query_file is not None:
        output, file_prompt = _read_query_file(query_file, template)
        the_query = Query(output, {**file_prompt, **prompt})
    if the_query is None:
        fail(f"give {what} with --query (or a --trace results file that holds it)")
    the_query.formatted(template)  # empty, unknown fields
    return the_query


def _fix_tabular(train_file, target, model, query, rows, n_random, trust_pickle) -> dict:
    from datablame.cli.tabular import _check_inputs, load_task
    from datablame.tabular import fix_tabular

    _check_inputs(train_file, model, query, "auto")
    t, _, y_query = load_task(train_file, target, model, query, trust_pickle)
    return fix_tabular(t, rows, y_query, n_random=n_random)


def _print_fix(result: dict) -> None:
    if "before" in result:  # a language model
        for name, run in (("before", result["before"]), ("after", result["after"])):
            console.print(f"{name:>7}: loss {run['loss']:.3f}, says "
                          f"{'yes' if run['says'] else 'no '}: {run['generation'][:100]!r}",
                          highlight=False, soft_wrap=True)
        console.print(result["summary"], highlight=False, soft_wrap=True)
        console.print(f"fixed adapter: {result['fixed_adapter']}", highlight=False)
        return
    from rich.table import Table

    moved = [i for i, q in enumerate(result["queries"])
             if result["changed"][i] > 0 or result["changed_by_random"][i] > 0]
    table = Table(title=f"query rows whose prediction moved, before and after removing "
                        f"{len(result['removed'])} rows")
    truth = "true" in (result["queries"][0] if result["queries"] else {})
    heads = ["query", *(["true"] if truth else []), "before", "after",
             *(("p(before label) before", "after") if not result["regression"] else ()),
             "moved by random rows"]
    for c in heads:
        table.add_column(c, justify="right")
    for i in moved:
        q = result["queries"][i]
        cells = [str(q["query"]), *([str(q["true"])] if truth else []), str(q["before"]),
                 str(q["after"])]
        if not result["regression"]:
            cells += [f"{q['p_before_label']['before']:.3f}",
                      f"{q['p_before_label']['after']:.3f}"]
        cells.append(f"{result['changed_by_random'][i]:.3g}")
        table.add_row(*cells)
    console.print(table)
    if len(moved) < len(result["queries"]):
        console.print(f"{len(result['queries']) - len(moved)} query rows moved in no run "
                      "(--json has every one)", highlight=False)
    console.print(result["summary"], highlight=False, soft_wrap=True)
