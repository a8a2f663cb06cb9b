"""Evaluation against external metric definitions: COCO box AP through pycocotools (`coco`)."""
