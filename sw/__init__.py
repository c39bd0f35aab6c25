"""dynacc.sw: the deploy folder (weights, exponents, layer program) and its readers.

* :mod:`dynacc.sw.export`: ``export_program`` / ``deploy_model`` (``python sw/deploy.py``)
* :mod:`dynacc.sw.reader`: ``load_deploy(path, hw)`` -> :class:`~dynacc.sw.reader.Deploy`
* :mod:`dynacc.sw.runtime`: the host side of running a deploy folder (``chain``)
* :mod:`dynacc.sw.fileformat`, :mod:`dynacc.sw.cheader`: the folder's files
"""

from .reader import Deploy, DeployError, DeployHostStep, DeployLayer, load_deploy

__all__ = ["Deploy", "DeployError", "DeployHostStep", "DeployLayer", "load_deploy"]
