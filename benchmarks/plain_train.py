"""The script one would write instead of the template: plain PyTorch and torchvision, the same recipe as
`python train.py`'s defaults on the embedded digits. benchmarks/end_to_end.py runs both as whole processes.

    python benchmarks/plain_train.py data/digits [--seed 0]

ImageFolder on ROOT/{train,val,test}, Resize(32) and CenterCrop(32) of the RGB images, ImageNet normalisation,
resnet18 with a 10-way head, batches of 64 (the last partial training batch dropped), 2 loader processes kept
across epochs, AdamW (lr 1e-3, weight decay 0.01), 10 % linear warmup then cosine, stepped per batch, 5 epochs,
validation after each, the best validation weights saved (torch.save of the state dict) and tested at the end.
"""

import argparse
import copy
import math

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torchvision.transforms import v2


def accuracy(model: torch.nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = total = 0
    with torch.inference_mode():
        for images, labels in loader:
            correct += (model(images).argmax(dim=1) == labels).sum().item()
            total += len(labels)
    model.train()
    return correct / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    preprocess = v2.Compose([
        v2.ToImage(), v2.Resize(32), v2.CenterCrop(32), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])  # fmt: skip
    splits = {s: torchvision.datasets.ImageFolder(f"{args.root}/{s}", preprocess) for s in ("train", "val", "test")}
    loader = {
        s: DataLoader(data, batch_size=64, shuffle=s == "train", drop_last=s == "train", num_workers=2,
                      persistent_workers=True)
        for s, data in splits.items()
    }  # fmt: skip
    model = torchvision.models.resnet18(num_classes=len(splits["train"].classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    total = args.epochs * len(loader["train"])
    warmup = max(1, round(0.1 * total))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    best, best_state = -1.0, None
    for epoch in range(args.epochs):
        for images, labels in loader["train"]:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        val = accuracy(model, loader["val"])
        print(f"epoch {epoch}: loss {loss.item():.4f}, val acc {val:.4f}", flush=True)
        if val > best:
            best, best_state = val, copy.deepcopy(model.state_dict())
            torch.save(best_state, "best.pt")
    model.load_state_dict(best_state)
    print(f"test acc {accuracy(model, loader['test']):.4f}")


if __name__ == "__main__":
    main()
