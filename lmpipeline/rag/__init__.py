"""Retrieval-augmented generation over the knowledge base (the `rag` stage and `rag-ask`).

Answering, which `rag-ask` imports without any training code:
    lexical       BM25 (bm25s): the lexical retriever, and the sentences that state an answer
    knowledge     the entries (corpus chunks, optional train FAQ), the gold rule, passages.jsonl
    index         dense embeddings in FAISS, reciprocal-rank fusion with BM25
    system        the `System` interface, config.json, hits and answers
    cpt_sft       the cpt-sft system: CPT retriever + SFT generator
    rag_sequence  the rag-sequence system: transformers' RagSequenceForGeneration
    ask           load_system() and the rag-ask command

Building, which the stage runs:
    backend             the `Backend` interface and the flow both backends share (`build`)
    cpt_sft_train       contrastive fine-tuning of the retriever (start choice, hard negatives)
    reader              teaching the generator to read retrieved passages (RAFT)
    rag_sequence_train  marginal-likelihood fine-tuning of the RAG model
    evaluation          the scores of metrics/rag.json, predictions and recall curves
"""
