"""What the trainer trains: the task interface (`base.Task`), the tasks, `get_task(config, ...)`.

The loop in crossformer_jax.training.trainer is task-agnostic: sharding, the optimizer, checkpoints,
preemption, resume, logging and the data sources are shared. A task supplies the rest:

* `create_model(config)` and `init_variables(model, rng)`: the Flax module and its variables
  (`{'params': ..., <model state such as 'batch_stats'>}`);
* `dataset_info(data_config)` and `steps_per_epoch(info, batch_size)`: classes and split sizes
  (default: crossformer_jax.data.sources) and the length of an epoch in global batches;
* `create_train_iterator(config, start_step=...)`: this process's share of the endless training
  batches (numpy dicts), resumable at any step. Tasks fed by the shared tf.data pipeline derive from
  `base.TfDataTask` and give its per-example functions instead: `train_decode(data_config, seed,
  process_index)` (how a training element is decoded; its failures mark corrupt files) and
  `train_preprocess(...)` / `eval_preprocess(data_config)` (decoded element dict -> example dict);
* `train_batch_spec(config, batch_size)`: the shapes of a global training batch;
* `transform_batch(rng, batch, mesh)`: an on-device transform of the global training batch
  (RandAugment, mixup), split over the mesh;
* `loss(model, params, model_state, batch, rng)` -> (scalar loss, new model state);
* `make_evaluator(model, mesh, variables_sharding, config)`: a callable that runs one pass over the
  validation split and returns numpy sums over every host (scores for detection) that
  `final_metrics` turns into metrics, built on
  `eval_program(model, config)`, the pure per-batch (or per-image) function that
  `--mode compile` compiles too;
* `pretrained_params(source, target)`: how a pretrained checkpoint's parameters map into the
  model (`config.init_from`) and which may start fresh (a new head);
* `preprocessing(config)`: how a trained model's inputs are prepared at inference (stored with the
  weights for predict.py);
* `final_metrics(sums)` -> floats, `best_metric`: the metric (higher is better) that picks the best
  checkpoint, and `describe(metrics)`: the metrics as one log-line fragment.

Batches are dicts, so a task defines its own targets (class ids, label maps, boxes...).
"""

from __future__ import annotations

import ml_collections

from crossformer_jax.tasks.base import Task, check_split_directories, model_overrides
from crossformer_jax.tasks.classification import ClassificationTask
from crossformer_jax.tasks.detection import DetectionTask
from crossformer_jax.tasks.instance_segmentation import InstanceSegmentationTask
from crossformer_jax.tasks.segmentation import SegmentationTask

TASKS: dict[str, type[Task]] = {
    task.name: task
    for task in (ClassificationTask, SegmentationTask, DetectionTask, InstanceSegmentationTask)
}

__all__ = ['TASKS', 'Task', 'check_split_directories', 'get_task', 'model_overrides', 'task_class']


def task_class(config: ml_collections.ConfigDict) -> type[Task]:
    """The Task subclass named by config.task ('classification' when absent)."""
    name = config.get('task', 'classification')
    if name not in TASKS:
        raise ValueError(f'unknown config.task {name!r}; available: {", ".join(TASKS)}')
    return TASKS[name]


def get_task(config: ml_collections.ConfigDict, num_classes: int) -> Task:
    """The task of config.task for a dataset of num_classes classes."""
    return task_class(config).from_config(config, num_classes)
