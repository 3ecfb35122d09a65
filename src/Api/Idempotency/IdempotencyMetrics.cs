using System.Diagnostics.Metrics;

namespace OrleansIdempotency.AspNetCore;

/// <summary>The layer's one meter: how each idempotent request ended, by <c>result</c>.</summary>
internal sealed class IdempotencyMetrics : IDisposable
{
    /// <summary>The meter's name, for OpenTelemetry's <c>AddMeter</c>.</summary>
    public const string MeterName = "OrleansIdempotency";

    private readonly Meter meter;
    private readonly Counter<long> requests;

    public IdempotencyMetrics(IMeterFactory meters)
    {
        meter = meters.Create(MeterName);
        requests = meter.CreateCounter<long>("idempotency.requests", unit: "{request}",
            description: "Requests to idempotent endpoints, by how they ended.");
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

    // The action ran and may have taken effect, but left no outcome to store: its key lapses into outcome-unknown,
    // for an operator to settle. The one result worth an alert.
    public const string InDoubt = "in_doubt";
}
