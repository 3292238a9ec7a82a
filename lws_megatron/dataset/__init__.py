"""A tokenized dataset as training and export read it: Megatron's indexed .bin/.idx files
(`indexed`), the manifest that says what they hold (`manifest`), the checks run before anything
reads them (`integrity`), and the tokenizer that made them (`tokenizer`, `hf_tokenizer`).
`data_prep` writes datasets with these; nothing here imports data_prep, torch or Megatron."""
