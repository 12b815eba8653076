"""lm-pipeline's library: what the DVC stages in `stages/` share.

Layers, top first; a module imports only from its own layer and those below it (a test checks):

    launch                  a training stage's entry point: run under torchrun when asked
    rag/ building           backend (the flow both backends share), cpt_sft_train,
                            rag_sequence_train, evaluation (the scores of metrics/rag.json)
    cpt, sft, validation    each phase's pieces: masked-LM blocks and masking; chat examples
                            with the loss on responses, batches; the data files' suites
    training                the Hugging Face Trainer with the stage's loss, resume, FSDP, MFU
    rag/ answering          ask, cpt_sft, rag_sequence (the two systems), system, index,
                            knowledge: what `rag-ask` loads, without any training code
    models, chat, stage,    model files; templates and generation; run(params, paths) and
    report, smoke, docs     one-line errors; the summary table; make smoke; make docs
    errors, params, data,   StageError; the typed params.yaml (single source of defaults);
    runtime, metrics        files; device and process; the scores of the metrics files
"""
