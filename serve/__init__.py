"""Ray Serve deployments of the APM and the steerable generator, and their app builder.

Not built yet: the deployments arrive with the Serve stage. The package exists so that the
layout (helpsteer_core / ray_jobs / serve) is fixed from the start.
"""
