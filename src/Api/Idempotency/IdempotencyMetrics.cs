using System.Diagnostics.Metrics;

namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// The layer's one meter: how each idempotent request ended, by <c>result</c>; how each Once API call ended, by
/// <c>operation</c> and <c>result</c>; and the writes waiting for the store.
/// </summary>
internal sealed class IdempotencyMetrics : IDisposable
{
    /// <summary>The meter's name, for OpenTelemetry's <c>AddMeter</c>.</summary>
    public const string MeterName = "OrleansIdempotency";

    private readonly Meter meter;
    private readonly Counter<long> requests;
    private readonly Counter<long> onceCalls;

    public IdempotencyMetrics(IMeterFactory meters, IdempotencyGrainCalls calls)
    {
        meter = meters.Create(MeterName);
        requests = meter.CreateCounter<long>("idempotency.requests", unit: "{request}",
            description: "Requests to idempotent endpoints, by how they ended.");
        onceCalls = meter.CreateCounter<long>("idempotency.once.calls", unit: "{call}",
            description: "Once API calls (HTTP, and ExecuteOnceAsync), by operation and how they ended.");
        // During a store outage: how many keys wait to be completed or released, each in doubt until its write lands.
        meter.CreateObservableGauge("idempotency.writes.waiting", () => calls.HeldForTheStore, unit: "{write}",
            description: "Completions and releases waiting in this process for the store to take them.");
    }

    public void Record(string result) => requests.Add(1, new KeyValuePair<string, object?>("result", result));

    /// <param name="operation">One of <see cref="OnceOperations"/>.</param>
    /// <param name="result">What the call ended with: one of <see cref="OnceResults"/>, or the problem it answered (<see cref="IdempotencyProblem.Name"/>).</param>
    public void RecordOnce(string operation, string result) =>
        onceCalls.Add(1, new KeyValuePair<string, object?>("operation", operation), new KeyValuePair<string, object?>("result", result));

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

/// <summary>The values of the Once calls' <c>operation</c> tag.</summary>
internal static class OnceOperations
{
    public const string Claim = "claim";
    public const string Complete = "complete";
    public const string Renew = "renew";
    public const string Release = "release";
    public const string Read = "read";

    // ExecuteOnceAsync: claim, run, complete in one.
    public const string Execute = "execute";
}

/// <summary>
/// The Once calls' <c>result</c> tag when no problem was answered (a refusal is tagged with its problem's name:
/// <c>outcome-unknown</c>, <c>store-unavailable</c>, <c>claim-not-held</c>, ...).
/// </summary>
internal static class OnceResults
{
    public const string Acquired = "acquired";
    public const string Replayed = IdempotencyResults.Replayed;
    public const string Completed = "completed";
    public const string Renewed = "renewed";
    public const string Released = IdempotencyResults.Released;
    public const string Read = "read";
    public const string Executed = IdempotencyResults.Executed;

    // An exception no answer was made of: a fault of the server's (a 500), or a request time-out outside the layer.
    public const string Failed = "failed";

    // As the requests' results: the caller left or cancelled before an answer (over HTTP, a claim made with the
    // caller's own attempt may stand); the action ran and may have taken effect, but its outcome was not stored
    // (ExecuteOnceAsync only).
    public const string Abandoned = IdempotencyResults.Abandoned;
    public const string InDoubt = IdempotencyResults.InDoubt;
}
