"""Task registry: datasets, architectures and training recipes of target-network families."""

from metaflow_ws.tasks.datasets import DataUnavailableError, TaskData, register_builder
from metaflow_ws.tasks.registry import (
    FlowRecipe,
    Recipe,
    Synthetic,
    Task,
    TaskFileError,
    UnknownTaskError,
    get_task,
    list_tasks,
    load_task_file,
    register_task,
    task_from_dict,
)

__all__ = [
    "DataUnavailableError",
    "FlowRecipe",
    "Recipe",
    "Synthetic",
    "Task",
    "TaskData",
    "TaskFileError",
    "UnknownTaskError",
    "get_task",
    "list_tasks",
    "load_task_file",
    "register_builder",
    "register_task",
    "task_from_dict",
]
