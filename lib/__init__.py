"""
What the scripts at the root share and a user does not run, one job per file:

    cli.py          knobs from config files and --key=value flags, --help, one-line errors, progress,
                    the printed summaries (changed knobs, parameter table)
    hardware.py     device, dtype and DDP: chosen once, printed once with the reason; the stop
                    signal (Ctrl-C, SIGTERM); MFU
    files.py        files and folders written atomically (never half of one); an OSError as one line
    runs.py         a run's folder: checkpoints, the run lock, log.jsonl, the summary it ends with
    loading.py      a model back from what init_from names (a run's ckpt.pt, GPT-2 weights),
                    with its tokenizer
    resume.py       starting or continuing a run: its knobs checked, which checkpoint, the training
                    state saved and restored exactly (optimizer, RNGs)
    batches.py      the batch plan: each process's batches per iteration, eval batches, warmups
    tokenfiles.py   prepared data on disk: uint16 token files, loss masks and meta.json, written
                    and checked
    tokenizers.py   characters, GPT-2 BPE, an own BPE and the counting task behind one Tokenizer;
                    the chat markers added to any of them
    chat.py         the chat template: conversations in, token ids and a loss mask out; a base
                    model's vocabulary grown, replies generated until <|end|>, answers scored
    chat_data.py    a chat dataset written: conversations -> tokens, a loss mask, meta.json
    download.py     downloads with retries, a checksum and a progress line; big ones resume
    corpora.py      big corpora streamed into token files: Hub listings, parquet, llm.c shards
    sampling.py     prompts in, streamed text out (sample.py and serve.py)
    serving.py      serve.py's batched decoding engine (a cache of rows of different lengths) and
                    its request schema
    evaluation.py   perplexity, counting accuracy, HellaSwag (evaluate.py); train.py's split losses
    plotting.py     loss curves and attention maps as PNG files; the maps themselves (serve.py too)
    export.py       GGUF files for llama.cpp and Hugging Face GPT-2 folders (export.py)

and the files people edit to experiment, each standing apart from model.py (docs/hacking.md):

    optim.py        AdamW and Muon, parameters grouped by role
    lora.py         LoRA adapters, wrapped around a GPT's Linear layers from outside
    quantize.py     int8 weights for inference
    bpe.py          training an own byte-level BPE tokenizer
"""
