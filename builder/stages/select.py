"""select: the architecture search's choice, the candidate with the lowest held-out loss after
its light distillation; the student's full distillation continues from its checkpoint. For a
serving budget the candidates are those that meet it (builder.pruning.budgets), and each row
records its measured cost and margins."""
from __future__ import annotations

import dataclasses
import logging

from builder.pruning.budgets import ServingCost, margins
from builder.spec.schema import BudgetSpec
from builder.stages.base import StageContext, StageKind, StageResult

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> StageResult:
    table = [_candidate_row(ctx, index) for index in range(len(ctx.config["candidates"]))]
    best = min(range(len(table)), key=lambda index: table[index]["heldout_loss"])
    chosen = table[best]
    summary = {"model_dir": chosen["model_dir"], "shape": chosen["shape"], "params": chosen["params"],
               "layers_kept": chosen["layers_kept"], "chosen": best, "candidates": table}
    log.info("search for %s: chose %s (held-out loss %.4f) of %d candidates", ctx.stage.student,
             ctx.config["candidates"][best], chosen["heldout_loss"], len(table))
    return summary, 0


def _candidate_row(ctx: StageContext, index: int) -> dict:
    pruned, trained = ctx.inputs[f"pruned-{index}"].summary, ctx.inputs[f"trained-{index}"]
    ranked = ctx.inputs[f"ranked-{index}"].summary["perplexity"]
    row = {"tag": ctx.config["candidates"][index], "shape": pruned["shape"], "params": pruned["params"],
           "layers_kept": pruned["layers_kept"], "tokens": trained.tokens,
           "train_loss": trained.summary.get("final_loss"), "heldout_loss": ranked["nll"],
           "heldout_tokens": ranked["tokens"], "model_dir": trained.summary["model_dir"]}
    if "budget" in ctx.config:  # a serving budget: the candidate's measured cost and its margins
        measured = ctx.inputs[f"serving-{ctx.config['measured'][index]}"].summary
        cost = ServingCost.of(measured, ctx.inputs["serving-teacher"].summary)
        row["serving"] = {**dataclasses.asdict(cost), "margins": margins(BudgetSpec(**ctx.config["budget"]), cost)}
    return row


KIND = StageKind("select", version="1", run=run, resources="light",
                 title="the search's candidate with the lowest held-out loss", record="SearchRecord", card_section="_lineage_section")
