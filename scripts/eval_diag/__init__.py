"""The diagnosis evaluation harness's programs and scoring (see scripts/eval_diagnosis.py).

Runs in: the harness's processes (training runs: torch; scoring: the analysis only).

Each program is a small, real training script written the way a user writes one, against
the README's instructions only (not against the rules): a raw-loop MLP on a table, a raw-loop
CNN on images, a raw-loop character GPT, a Hugging Face ``Trainer`` run and a Lightning run.
Each runs healthy and with bugs injected (:mod:`.cases`); the records they leave are then
diagnosed and scored (:mod:`.scoring`).
"""
