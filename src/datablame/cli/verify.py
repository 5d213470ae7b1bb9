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
    html: Annotated[Optional[Path], typer.Option(help=HTML_HELP)] = None,  # noqa: UP045
) -> None:
    """Check an attribution against retraining. Tabular: LDS, remove-top-k, leave-one-out.
    LM: re-fine-tune without the blamed rows and without random rows; does the model still
    say it?"""
    check_html(html)
    if model.is_dir():
        _verify_text(train_file, model, adapter, query, trace, remove, remove_top_k, random,
                     recipe, field, out, cache, lds_subsets or 0, html)
        return
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
                 recipe_file, fields, out, cache, lds_subsets, html=None) -> None:
    from datablame.cli.main import _parse_fields, _read_query_file
    from datablame.outputs import check_output_dir, check_output_file, is_json_with
    from datablame.store.atomic import write_json_atomic
    from datablame.text import Query
    from datablame.text_verify import (
        lds_text,
        resolve_recipe,
        rows_from_trace,
        scores_from_trace,
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
    prompt = _parse_fields(fields)
    the_query = None
    if trace is not None:
        rows = rows_from_trace(trace, top_k)
        saved = json.loads(trace.read_text())
        if saved.get("query") is not None:
            the_query = Query(str(saved["query"]), {k: v if isinstance(v, list) else str(v)
                                                   for k, v in
                                                   (saved.get("prompt") or {}).items()},
                              saved.get("focus") or None)
    else:
        rows = parse_rows(remove, "--remove")
    if query_file is not None:
        output, file_prompt = _read_query_file(query_file, template)
        the_query = Query(output, {**file_prompt, **prompt})
    if the_query is None:
        fail("give the query with --query (or a --trace results file that holds it)")
    the_query.formatted(template)  # empty, unknown fields
    result = verify_text(train_file, model, adapter, the_query, remove=rows,
                         n_random=n_random, recipe_file=recipe_file, cache=cache)
    if lds_subsets:
        n = result["n_train"]
        scores, key, listed = scores_from_trace(trace, n)
        if listed < n:
            console.print(f"note: the trace lists {listed} of {n} rows; the others count as "
                          f"0 (trace --all-rows --top-k {n} scores every row)", highlight=False)
        result["lds"] = {"scored_by": key, "rows_listed": listed, **lds_text(
            train_file, model, adapter, the_query, scores, n_subsets=lds_subsets,
            recipe_file=recipe_file, cache=cache)}
    write_json_atomic(out, result)
    for name, run in [("original adapter", result["original"]),
                      *((n, r) for n, r in result["runs"].items())]:
        console.print(f"{name:>18}: loss {run['loss']:.3f}, says "
                      f"{'yes' if run['says'] else 'no '}: {run['generation'][:80]!r}",
                      highlight=False, soft_wrap=True)
    console.print(result["summary"], highlight=False, soft_wrap=True)
    if "lds" in result:
        lds = result["lds"]
        console.print(f"LDS over {lds['subsets']} random halves (trace's '{lds['scored_by']}' "
                      f"column vs re-fine-tuned query loss): {lds['lds']:.2f} (95% CI "
                      f"{lds['ci95'][0]:.2f} to {lds['ci95'][1]:.2f})", highlight=False,
                      soft_wrap=True)
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
