using System.Diagnostics.Metrics;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// The layer's one meter: how each idempotent request ended, by <c>result</c>; and the writes waiting for the store.
/// </summary>
internal sealed class IdempotencyMetrics : IDisposable
{
    /// <summary>The meter's name, for OpenTelemetry's <c>AddMeter</c>.</summary>
    public const string MeterName = "OrleansIdempotency";

    private readonly Meter meter;
    private readonly Counter<long> requests;

    public IdempotencyMetrics(IMeterFactory meters, IdempotencyGrainCalls calls)
    {
        meter = meters.Create(MeterName);
        requests = meter.CreateCounter<long>("idempotency.requests", unit: "{request}",
            description: "Requests to idempotent endpoints, by how they ended.");
        // During a store outage: how many keys wait to be completed or released, each in doubt until its write lands.
        meter.CreateObservableGauge("idempotency.writes.waiting", () => calls.HeldForTheStore, unit: "{write}",
            description: "Completions and releases waiting in this process for the store to take them.");
    }

    public void Record(string result) => requests.Add(1, new KeyValuePair<string, object?>("result", result));

    public void Dispose() => meter.Dispose();
}

/// <summary>The values of the <c>result</c> tag.</summary>
internal static class IdempotencyResults
{
    public const string Executed = "executed";
    public const string Released = "released";
    public const string Replayed = "replayed";
    public const string Rejected = "rejected";
    public const string Unavailable = "unavailable";

    // The client left before the action began (mid-body, or while its claim was written or it waited): nothing ran.
    public const string Abandoned = "abandoned";

    // The action ran and may have taken effect, but left no outcome to store: its key lapses into outcome-unknown,
    // for an operator to settle. The one result worth an alert.
    public const string InDoubt = "in_doubt";
}
