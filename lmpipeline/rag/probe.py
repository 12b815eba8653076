"""How well an encoder, as it is, ranks the gold chunks of the train questions: the figure that
shows whether continued pre-training kept the geometry a retriever starts from.

The `cpt` stage reports it before and after training (`metrics/cpt.json`), beside the masked-LM
figures; the `rag` stage ranks its candidate starts the same way. Only train questions are read:
a held-out question never reaches the encoder's choices or the figures that inform them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpipeline.metrics import gold_ranks, retrieval_scores
from lmpipeline.params import RagParams
from lmpipeline.rag.index import build_index, embed, search
from lmpipeline.rag.knowledge import KnowledgeBase, Questions, knowledge_base


@dataclass(frozen=True)
class RankingProbe:
    """The knowledge base, the train questions whose answer one of its chunks states, and the
    embedding settings of the rag stage."""

    kb: KnowledgeBase
    stated: Questions
    max_length: int
    batch_size: int

    @classmethod
    def of(
        cls,
        passages: list[str],
        train: list[dict[str, Any]],
        source: Path,
        cfg: RagParams,
    ) -> RankingProbe:
        kb = knowledge_base(passages, train, cfg.chunk_words, cfg.chunk_overlap, cfg.faq)
        stated = kb.questions(train, source).in_corpus()
        return cls(kb, stated, cfg.max_length, cfg.batch_size)

    def mrr(self, encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> float:
        """Mean reciprocal rank of each question's first gold chunk, by `encoder`'s mean-pooled
        embeddings over an exact index (0.0 without a stated question)."""
        if not self.stated.records:
            return 0.0
        size = (self.max_length, self.batch_size)
        entries = embed(encoder, tokenizer, [e.text for e in self.kb.entries], *size)
        index = build_index(entries, "flat")
        queries = embed(encoder, tokenizer, self.stated.questions, *size)
        ranked = search(index, queries, index.ntotal)[1]
        return retrieval_scores(gold_ranks(ranked, self.stated.golds))["mrr"]
