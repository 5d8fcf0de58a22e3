"""The planner head: flow matching (flow_matching.py), the Action MoE and its routers (action_moe.py), the head
(planner.py), its state input (ego_state.py) and ego-box geometry (geometry.py). Backbone-agnostic except
vlm.py, the one module that reads the vision-language model. No imports here: the data generator uses the
geometry without loading the model code."""
