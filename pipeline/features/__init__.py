"""Backbone features of a manifest's images: the content-keyed cache (``cache``), extraction
on a device (``extract``) and scoring a manifest with a trained network (``scoring``)."""
