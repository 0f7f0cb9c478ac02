"""Retrieval metrics: recall@N (with Tokyo NMS / TokyoTM exclusion), mAP (Oxford/Paris, revisited, Holidays)."""
