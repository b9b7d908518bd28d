"""Evaluations of a pre-trained encoder.

- :mod:`.linprobe` — linear probe of the frozen encoder (``python -m randsac_fast.linprobe``);
- :mod:`.attnprobe` — attentive probe (AIM's; ``python -m randsac_fast.attnprobe``), on the linear probe's loop;
- :mod:`.finetune` — end-to-end fine-tuning (``python -m randsac_fast.finetune``);
- :mod:`.knn` — the k-NN monitor the trainer runs while pre-training;
- :mod:`.probe` — the quick scikit-learn probe of the digits demo.
"""
