"""The Problem: the one place that runs the model. Loss, gradient, Hessian- and Gauss-Newton-vector products at any
point (:mod:`.problem`, the products' engines in :mod:`.products`), many slice points at once (:mod:`.points`, the
strategy timed in :mod:`.strategy`), per-sample gradients (:mod:`.persample`), the curvature operator over a
parameter subset (:mod:`.curvature`), losses and the model-output rule (:mod:`.losses`, :mod:`.outputs`), and the
routing of the input and output layers that lets slice points share work (:mod:`.inputlayer`, :mod:`.outputlayer`,
:mod:`.replica`). Imports :mod:`landscape.io`, :mod:`landscape.linalg` and :mod:`landscape.runtime`, never the
analyses."""

from .problem import BN_TYPES, Evaluation, Params, Problem

__all__ = ["BN_TYPES", "Evaluation", "Params", "Problem"]
