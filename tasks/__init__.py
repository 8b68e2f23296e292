"""The shared module: tasks, instances, sequences, prompt building, loaders, candidate pools, model resolution."""
from tasks.core import SPLITS, Instance, Sequence, Task, instances_hash
from tasks.errors import SapoError, cli_main
from tasks.prompts import IGNORE_INDEX, Encoded, encode_example, encode_prompt, pad_batch, render_prompt, user_message
