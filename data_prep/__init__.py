"""Offline data preparation: tokenizer training, tokenization to Megatron .bin/.idx, checks.

    python -m data_prep.demo_corpus --output DIR              demo text from the stdlib's docs
    python -m data_prep.tokenizer train --input ... --vocab-size N --output PREFIX [--format hf]
    python -m data_prep.preprocess --input ... --tokenizer PREFIX.model --output-prefix DATA
    python -m data_prep.import_tokens --input A.npy --dtype uint32 --tokenizer T --output-prefix D
    python -m data_prep.inspect DATA                          statistics and integrity checks
    python -m data_prep.bench                                 speed against the raw tokenizer

A tokenizer is a sentencepiece .model or a Hugging Face tokenizer.json.

A dataset DATA is DATA_train.{bin,idx}, DATA_valid.{bin,idx} (when a validation fraction is
asked for) and DATA.manifest.json. Readers call lws_megatron.dataset.integrity.verify_dataset
first (lws_megatron.dataset holds the format, the manifest, the checks and the tokenizer loader;
data_prep imports it, never the reverse).
"""
