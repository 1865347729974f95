"""Model folders: cards, the architecture allow-list, and the registry of bundled and installed models."""

from .card import CARD_FILE, WEIGHTS_FILE, Label, ModelCard, card_from_dict, read_card, write_card
from .registry import DEFAULT_MODEL_ID, ModelEntry, find_model_folder, list_models, resources_dir

__all__ = [
    "CARD_FILE",
    "DEFAULT_MODEL_ID",
    "WEIGHTS_FILE",
    "Label",
    "ModelCard",
    "ModelEntry",
    "card_from_dict",
    "find_model_folder",
    "list_models",
    "read_card",
    "resources_dir",
    "write_card",
]
