"""Local features for geometric re-ranking: extractors, matchers, verification, hloc files.

```python
from hafloc.local import create_extractor, create_matcher, verify
ex = create_extractor("xfeat", max_side=640, max_keypoints=1024)   # EXTRACTORS: xfeat aliked disk superpoint
f0, f1 = ex.extract_path("a.jpg"), ex.extract_path("b.jpg")        # LocalFeatures
m = create_matcher(ex.default_matcher, extractor=ex.name)          # MATCHERS: lighterglue lightglue mnn
r = m.match(f0, f1)                                                # MatchResult (matches (M,2), scores)
v = verify(f0.keypoints, f1.keypoints, r.matches)                  # Verification (inliers, mask, model, matrix)
```
"""

from ..hloc_h5 import names_to_pair
from .extractors import EXTRACTORS, LocalExtractor, create_extractor
from .features import LocalFeatures, MatchResult
from .hloc_io import (
    feature_datasets,
    list_feature_names,
    read_local_features,
    read_matches,
    stored_bytes,
    write_local_features,
    write_matches,
)
from .matchers import MATCHERS, Matcher, create_matcher
from .verify import Verification, verify

__all__ = [
    "EXTRACTORS",
    "MATCHERS",
    "LocalExtractor",
    "LocalFeatures",
    "MatchResult",
    "Matcher",
    "Verification",
    "create_extractor",
    "create_matcher",
    "feature_datasets",
    "list_feature_names",
    "names_to_pair",
    "read_local_features",
    "read_matches",
    "stored_bytes",
    "verify",
    "write_local_features",
    "write_matches",
]
