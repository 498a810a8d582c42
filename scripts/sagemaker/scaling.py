"""Step 5, scale: Application Auto Scaling as configured (target tracking on invocations or GPU
use), and released where SageMaker would refuse an update (an instance type change)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .settings import PromoteError, Settings


class Scaling:
    """The Promoter's scaling step (a mixin of scripts.sagemaker.promoter.Promoter)."""

    # from the Promoter (scripts/sagemaker/promoter.py)
    settings: Settings
    say: Callable[[str], None]
    client: Callable[[str], Any]
    describe: Callable[..., dict | None]  # endpoint.EndpointSteps

    def release_scaling_if_instance_type_changes(self, previous_config: str) -> bool:
        """SageMaker refuses an update that changes a scaled variant's instance type: drop the
        policy and target first (the scale step puts them back). True if it dropped them."""
        described = self.describe("describe_endpoint_config", EndpointConfigName=previous_config)
        variants = (described or {}).get("ProductionVariants", [])
        old_types = {v["VariantName"]: v["InstanceType"] for v in variants}
        if old_types.get(self.settings.variant_name) in (None, self.settings.instance_type):
            return False
        if not self.release_scaling():
            return False
        self.say("scale: deregistered the variant while its instance type changes")
        return True

    def release_scaling(self) -> bool:
        """Delete the variant's scaling policies and deregister it; False if it had none."""
        scaling = self.client("application-autoscaling")
        targets = scaling.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[self.settings.scaling_resource_id]
        )["ScalableTargets"]
        if not targets:
            return False
        policies = scaling.describe_scaling_policies(
            ServiceNamespace="sagemaker", ResourceId=self.settings.scaling_resource_id
        )["ScalingPolicies"]
        for policy in policies:
            scaling.delete_scaling_policy(
                PolicyName=policy["PolicyName"],
                ServiceNamespace="sagemaker",
                ResourceId=self.settings.scaling_resource_id,
                ScalableDimension="sagemaker:variant:DesiredInstanceCount",
            )
        scaling.deregister_scalable_target(
            ServiceNamespace="sagemaker",
            ResourceId=self.settings.scaling_resource_id,
            ScalableDimension="sagemaker:variant:DesiredInstanceCount",
        )
        return True

    def scaling_policy(self) -> dict:
        scaling = self.settings.autoscaling
        if scaling.metric == "SageMakerVariantInvocationsPerInstance":
            metric: dict = {
                "PredefinedMetricSpecification": {
                    "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
                }
            }
        elif scaling.metric == "GPUUtilization":
            metric = {
                "CustomizedMetricSpecification": {
                    "MetricName": "GPUUtilization",
                    "Namespace": "/aws/sagemaker/Endpoints",
                    "Dimensions": [
                        {"Name": "EndpointName", "Value": self.settings.endpoint_name},
                        {"Name": "VariantName", "Value": self.settings.variant_name},
                    ],
                    "Statistic": "Average",
                    "Unit": "Percent",
                }
            }
        else:
            raise PromoteError(
                f"autoscaling.metric {scaling.metric!r}: use SageMakerVariantInvocationsPerInstance"
                " or GPUUtilization"
            )
        return {
            "TargetValue": float(scaling.target_value),
            **metric,
            "ScaleInCooldown": int(scaling.scale_in_cooldown_s),
            "ScaleOutCooldown": int(scaling.scale_out_cooldown_s),
        }

    @property
    def policy_name(self) -> str:
        return f"{self.settings.endpoint_name}-target-tracking"

    def scale(self) -> dict:
        scaling, settings = self.settings.autoscaling, self.settings
        if not scaling.enabled:
            if self.release_scaling():
                self.say("scale: autoscaling disabled in configs/promote.yaml: deregistered")
            return {"enabled": False}
        client = self.client("application-autoscaling")
        common = {
            "ServiceNamespace": "sagemaker",
            "ResourceId": settings.scaling_resource_id,
            "ScalableDimension": "sagemaker:variant:DesiredInstanceCount",
        }
        targets = client.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[settings.scaling_resource_id]
        )["ScalableTargets"]
        wanted = (scaling.min_capacity, scaling.max_capacity)
        if not targets or (targets[0]["MinCapacity"], targets[0]["MaxCapacity"]) != wanted:
            self.say(f"scale: {settings.scaling_resource_id} between {wanted[0]} and {wanted[1]}")
            client.register_scalable_target(
                **common, MinCapacity=scaling.min_capacity, MaxCapacity=scaling.max_capacity
            )
        policy = self.scaling_policy()
        existing = client.describe_scaling_policies(
            ServiceNamespace="sagemaker",
            ResourceId=settings.scaling_resource_id,
            PolicyNames=[self.policy_name],
        )["ScalingPolicies"]
        current = existing[0].get("TargetTrackingScalingPolicyConfiguration") if existing else None
        if current is None or not same_policy(current, policy):
            self.say(f"scale: target tracking {scaling.metric} = {scaling.target_value}")
            client.put_scaling_policy(
                PolicyName=self.policy_name,
                PolicyType="TargetTrackingScaling",
                TargetTrackingScalingPolicyConfiguration=policy,
                **common,
            )
        else:
            self.say("scale: already as configured")
        return {"enabled": True, "min": wanted[0], "max": wanted[1], "policy": policy}


def same_policy(current: dict, wanted: dict) -> bool:
    keys = ("TargetValue", "ScaleInCooldown", "ScaleOutCooldown")
    metric_keys = ("PredefinedMetricSpecification", "CustomizedMetricSpecification")
    return all(current.get(k) == wanted.get(k) for k in keys) and all(
        current.get(k) == wanted.get(k) for k in metric_keys
    )
