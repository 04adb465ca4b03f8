"""`llmtags train`: LoRA fine-tuning of the base model on labelled records.

`config` (TrainConfig and the layer choice), `examples` (records as the inference prompt and its
answer, tokenised), `callbacks` (progress, dev evaluation that keeps the best adapter), and `recipe`
(the run, top to bottom: trl's SFTTrainer on CUDA, with QLoRA, and on CPU).

This file imports none of its modules, so reading a config does not load the trainer.
"""
