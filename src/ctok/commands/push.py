"""ctok push FOLDER REPO_ID: upload a checkpoint folder (config.json, weights, model card) to the hub."""
from __future__ import annotations

HELP = "upload a checkpoint folder (config.json, weights, model card README.md) to a Hugging Face hub model repo"


def add_arguments(parser) -> None:
    parser.add_argument("folder", help="a checkpoint folder: config.json + model.safetensors (a run's final/)")
    parser.add_argument("repo_id", help="the hub model repo, owner/name (created when missing)")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--revision", help="the branch to commit to, created when missing (default: main)")


def run(args) -> int:
    from ctok.publishing import publish

    upload, card = publish(args.folder, args.repo_id, private=args.private, revision=args.revision)
    if card is not None:
        print(f"wrote the model card {card} (its loading snippet names {args.repo_id})")
    print(f"uploaded {', '.join(upload.files)} to {upload.repo_id} (branch {upload.revision}): {upload.url}")
    return 0
