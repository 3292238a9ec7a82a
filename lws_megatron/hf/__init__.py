"""The Hugging Face side of an export: the checkpoint's weights (`weights`), the stock
architectures an isotropic run equals (`native`), the fast tokenizer (`tokenizer`), the LWS
modeling code that ships inside LWS exports (`configuration_lws`, `modeling_lws`) and how our
own tools load an export without running the folder's code (`loading`).

Importing `loading`, `native`, `tokenizer` or the modeling code needs `transformers` (the `hf`
extra); the training runtime never does.
"""
