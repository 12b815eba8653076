"""Stage `cpt`: continued masked-LM pre-training of the encoder on the domain text.

    python -m stages.cpt --tokens output/tokens/cpt --passages output/data/pretrain.txt \
        --questions output/data/rag/train.jsonl --output output/cpt \
        --metrics metrics/cpt.json --plots metrics/cpt

The blocks come from `tokenize_cpt` (memory-mapped); masking and the loss are in
`lmpipeline.cpt`; the Trainer, resume and timings in `lmpipeline.training`. Beside the
masked-LM figures, the encoder's ranking of the train questions' gold chunks before and after
(`train_question_mrr`, `lmpipeline.rag.probe`) shows whether CPT kept what a retriever needs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, set_seed

from lmpipeline import launch
from lmpipeline.cpt import (
    Masking,
    evaluate,
    fixed_eval_batches,
    flops_per_token,
    load_mlm,
    make_trainer,
    split_blocks,
)
from lmpipeline.data import read_jsonl, read_passages
from lmpipeline.models import check_positions, load_tokenizer, resolve_model, save_pretrained
from lmpipeline.params import Params
from lmpipeline.rag.probe import RankingProbe
from lmpipeline.runtime import is_main_process, precision, resolve_device
from lmpipeline.stage import INPUT, StageResult, TrainingPaths
from lmpipeline.tokens import TokenRows
from lmpipeline.tokens import load as load_tokens
from lmpipeline.training import (
    budget_of,
    checkpoint_dir,
    describe,
    throughput,
    train_resumable,
    training_args,
    within_budget,
    write_curves,
)


@dataclass(frozen=True, kw_only=True)
class CptPaths(TrainingPaths):
    stage: ClassVar[str] = "cpt"
    tokens: Path = field(metadata=INPUT)
    """The passages' token blocks (output of tokenize_cpt)."""
    passages: Path = field(metadata=INPUT)
    """The validated passages, one per line (the knowledge base the encoder is probed on)."""
    questions: Path = field(metadata=INPUT)
    """The validated train questions, with their gold chunks (never the held-out ones)."""
    output: Path
    """Where the encoder goes (a Hugging Face directory)."""


def scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    eval_batches: list[dict[str, torch.Tensor]],
    probe: RankingProbe,
) -> dict[str, float]:
    """The held-out masked-LM figures, and how the encoder ranks the train questions' golds."""
    return {
        **evaluate(model, eval_batches),
        "train_question_mrr": probe.mrr(model.base_model, tokenizer),
    }


def run(params: Params, paths: CptPaths) -> StageResult | None:
    """Train, save the encoder, write the curves; return metrics and timings (None on the ranks
    other than 0 of a distributed run, which train but write nothing)."""
    cfg, seed = params.cpt, params.seed
    set_seed(seed)
    device = resolve_device(params.device)
    mode = precision(params.fp16, device)
    source = resolve_model(cfg.model)
    tokenizer = load_tokenizer(source)
    model, fresh = load_mlm(source)
    model.to(device)
    check_positions(model, cfg.max_length, "cpt.max_length")

    expected = {"max_length": cfg.max_length}
    meta, splits = load_tokens(paths.tokens, tokenizer, "cpt", "tokenize_cpt", expected)
    train, heldout = split_blocks(TokenRows(splits["blocks"]), cfg.eval_fraction, seed)
    masking = Masking.of(tokenizer, cfg)
    eval_batches = within_budget(
        fixed_eval_batches(heldout, masking, cfg.batch_size, seed), budget_of(cfg, shifted=False)
    )
    print(
        f"cpt: {cfg.model}: {len(train)} train / {len(heldout)} eval blocks"
        f" of {cfg.max_length} tokens on {device} ({mode or 'fp32'})"
    )
    if is_main_process():
        probe = RankingProbe.of(
            read_passages(paths.passages), read_jsonl(paths.questions), paths.questions, params.rag
        )
        base = scores(model, tokenizer, eval_batches, probe)
        print(describe("cpt", "base", base))

    config = (asdict(cfg), seed, params.device, params.fp16, params.launch.strategy)
    checkpoints = checkpoint_dir("cpt", *config, meta["source"])
    args = training_args(cfg, seed, device, mode, checkpoints, len(train), params.launch)
    trainer = make_trainer(model, args, train, eval_batches, masking, cfg, fresh)
    model = train_resumable(trainer, "cpt")
    if not is_main_process():
        return None

    final = scores(model, tokenizer, eval_batches, probe)
    print(describe("cpt", "final", final))
    save_pretrained(paths.output, model, tokenizer)
    write_curves(trainer.state.log_history, paths.plots)
    speed = throughput("cpt", trainer, flops_per_token(model, cfg.mlm_probability), device)
    return StageResult({"base": base, "final": final}, {"train": speed})


def main(argv: list[str] | None = None) -> int:
    return launch.main(CptPaths, run, argv, __doc__, "stages.cpt")


if __name__ == "__main__":
    launch.exit_process(main())
