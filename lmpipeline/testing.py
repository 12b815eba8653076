"""Random-weight models built from configs and saved as Hugging Face directories: the tests' tiny
models (2 layers, hidden 32) and their word-level tokenizers, a tiny untrained RAG system laid out
as the `rag` stage saves one (what the server's tests and `benchmarks/serve_load.py --tiny` serve),
the benchmarks' full-size stand-ins of the original spec's models (bert-base-uncased, gpt2,
facebook/rag-sequence-nq), which cannot be downloaded here, and the headless browser that looks at
the playground.

No stage imports this module.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import faiss
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoModel,
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMaskedLM,
    DPRConfig,
    DPRQuestionEncoder,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenizer,
)

from lmpipeline.rag import cpt_sft
from lmpipeline.rag.index import build_index, embed
from lmpipeline.rag.knowledge import Entry, write_entries
from lmpipeline.rag.lexical import build_bm25
from lmpipeline.rag.system import INDEX_FILE, SystemConfig

if TYPE_CHECKING:
    from selenium.webdriver import Chrome

CORPUS = [
    "the model learns to predict masked tokens from context",
    "a retriever finds passages and the generator answers the question",
    "fine tuning on prompt and response pairs teaches the assistant style",
]

# BERT-family encoders of the tests (BERT, the DPR encoders): 2 layers, hidden 32.
TINY_ENCODER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}

M = TypeVar("M", bound=PreTrainedModel)


def random_model(model_type: type[M], config: PretrainedConfig, seed: int = 0) -> M:
    """`model_type(config)` with weights drawn from `seed`."""
    torch.manual_seed(seed)
    return model_type(config)


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> Path:
    """`model` and `tokenizer` as one Hugging Face directory."""
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_rag_sequence(
    question_encoder: DPRConfig, generator: BartConfig, seed: int = 0, **rag: Any
) -> RagSequenceForGeneration:
    """A RAG-sequence model (DPR question encoder + BART generator) of the given sizes, with
    random weights; `rag` sets RagConfig's own fields (retrieval_vector_size, n_docs, ...)."""
    config = RagConfig.from_question_encoder_generator_configs(question_encoder, generator, **rag)
    torch.manual_seed(seed)
    return RagSequenceForGeneration(
        config,
        question_encoder=DPRQuestionEncoder(config.question_encoder),
        generator=BartForConditionalGeneration(config.generator),
    )


def save_rag(
    model: RagSequenceForGeneration,
    questions: PreTrainedTokenizerBase,
    answers: PreTrainedTokenizerBase,
    path: Path,
) -> Path:
    """The RAG model and its two tokenizers, as `rag.model` reads them."""
    model.save_pretrained(path)
    RagTokenizer(question_encoder=questions, generator=answers).save_pretrained(path)
    return path


# --- the tests' tiny tokenizers and models -----------------------------------------------------


def word_vocab(specials: list[str]) -> dict[str, int]:
    words = sorted({w for line in CORPUS for w in line.split()})
    return {tok: i for i, tok in enumerate(specials + words)}


def wordpiece_tokenizer() -> PreTrainedTokenizerFast:
    """An uncased WordPiece tokenizer with BERT's special tokens."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(word_vocab(specials), unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


CHAT_WORDS = ["human", "assistant", "user", "system", ":", "?", "."]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def word_level_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """A GPT-2-like tokenizer (no chat template, one end-of-text token), or with `chat` a
    SmolLM2-like one: ChatML special tokens and template, <|im_end|> as end of turn."""
    specials = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = word_vocab(specials)
    vocab.update({w: len(vocab) + i for i, w in enumerate(CHAT_WORDS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if not chat:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|endoftext|>",
            bos_token="<|endoftext|>",
            unk_token="<unk>",
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def vocab_size(tokenizer: PreTrainedTokenizerFast) -> int:
    # len() of a word-level tokenizer can undercount its ids; the embedding must cover them all.
    return max(tokenizer.get_vocab().values()) + 1


def tiny_bert(path: Path) -> Path:
    """A 2-layer, hidden-32 BertForMaskedLM saved as a Hugging Face directory."""
    tokenizer = wordpiece_tokenizer()
    config = BertConfig(vocab_size=vocab_size(tokenizer), **TINY_ENCODER)
    return save(random_model(BertForMaskedLM, config), tokenizer, path)


def tiny_llama(path: Path) -> Path:
    """A 2-layer, hidden-32 LlamaForCausalLM with a ChatML chat template, like SmolLM2."""
    tokenizer = word_level_tokenizer(chat=True)
    config = LlamaConfig(
        vocab_size=vocab_size(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return save(random_model(LlamaForCausalLM, config), tokenizer, path)


# --- a tiny RAG system -------------------------------------------------------------------------

TINY_SYSTEM = {"top_k": 2, "max_length": 32, "max_new_tokens": 8}


def tiny_system(root: Path, encoder: Path, generator: Path) -> Path:
    """A cpt-sft system laid out as the `rag` stage saves one, without its training: `encoder`
    retrieves (hybrid) over the lines of CORPUS and `generator` answers, from root/rag and
    root/sft as from output/rag and output/sft. Returns root/rag. Seconds to build, where the
    stage itself takes about a minute on tiny models."""
    rag = root / "rag"
    shutil.copytree(generator, root / "sft")
    shutil.copytree(encoder, rag / cpt_sft.RETRIEVER_DIR)
    entries = [Entry(f"p{n}.0", text) for n, text in enumerate(CORPUS, start=1)]
    texts = [e.text for e in entries]
    model = AutoModel.from_pretrained(rag / cpt_sft.RETRIEVER_DIR, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(encoder, trust_remote_code=False)
    vectors = embed(model, tokenizer, texts, TINY_SYSTEM["max_length"], len(texts))
    faiss.write_index(build_index(vectors, "flat"), str(rag / INDEX_FILE))
    build_bm25(texts).save(str(rag / cpt_sft.BM25_DIR), show_progress=False)
    write_entries(rag, entries)
    SystemConfig(
        generator="../sft",
        retriever="hybrid",
        index_type="flat",
        prompt=cpt_sft.RAG_PROMPT,
        passage=cpt_sft.PASSAGE,
        closed_book_prompt=cpt_sft.CLOSED_BOOK_PROMPT,
        backend=cpt_sft.BACKEND,
        **TINY_SYSTEM,
    ).write(rag)
    return rag


# --- the playground in a headless browser ------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")  # Debian's
# Headless chromium as root on a machine without network: no sandbox (root), and nothing that
# would reach out (updates, sync, QUIC probes) and wait for a network that is not there.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1100",
]
ANSWERED = ("done", "error")  # the data-state of a playground answer that has ended


def missing_browser() -> str | None:
    """Why the playground cannot be looked at here, or None if it can."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if missing:
        return f"no {' or '.join(missing)}: apt-get install chromium chromium-driver"
    return None


@contextmanager
def chromium(profile: Path) -> Iterator[Chrome]:
    """Headless chromium driven by Selenium with a new empty profile in `profile`. The binaries
    are named, so Selenium Manager never looks for (downloads) a browser or a driver."""
    # Imported here: only the browser checks need selenium, and every test imports this module.
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options, Service(executable_path=str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def ask_in_playground(
    driver: Chrome, url: str, question: str, api_key: str | None = None, timeout: float = 30
) -> None:
    """Open the playground at `url`, ask `question` (with `api_key` in its key field) and wait
    until both answers, closed-book and with passages, have ended."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    if api_key is not None:
        driver.find_element(By.ID, "api-key").send_keys(api_key)
    driver.find_element(By.ID, "question").send_keys(question)
    driver.find_element(By.ID, "ask").click()

    def answered(d: Chrome) -> bool:
        answers = d.find_elements(By.CSS_SELECTOR, "[data-testid=answer]")
        return len(answers) == 2 and all(a.get_attribute("data-state") in ANSWERED for a in answers)

    WebDriverWait(driver, timeout).until(answered)
