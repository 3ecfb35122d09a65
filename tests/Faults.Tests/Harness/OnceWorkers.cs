using System.Collections.Concurrent;
using System.Globalization;
using System.Net;
using System.Net.Http.Headers;
using System.Net.Http.Json;
using System.Text.Json;

namespace OrleansIdempotency.Faults.Tests.Harness;

/// <summary>
/// Workers that use the Once API over HTTP the way its README tells them to: claim a key naming their own attempt, run
/// the operation only on <c>201 acquired</c>, complete it with the token; ask again with the same attempt after a
/// connection error or a 503 (on the other API node), after <c>request-in-progress</c> when <c>Retry-After</c> says.
/// Each run of an operation is counted here, where it happens. Every <c>loseEvery</c>-th answer to a claim or a
/// completion is thrown away after the API gave it, as a network or a load balancer loses one.
/// </summary>
public sealed class OnceWorkers : IDisposable
{
    private readonly AnswerLosingHandler losing;
    private readonly HttpClient[] clients;
    private long requests;
    private long unavailable;
    private long connectionErrors;

    public OnceWorkers(IReadOnlyList<Uri> nodes, int loseEvery)
    {
        losing = new AnswerLosingHandler(loseEvery);
        clients = nodes.Select(node => new HttpClient(losing, disposeHandler: false)
        {
            BaseAddress = node,
            Timeout = TimeSpan.FromSeconds(20),
            DefaultRequestHeaders = { Authorization = new AuthenticationHeaderValue("Bearer", "demo-alice") },
        }).ToArray();
    }

    /// <summary>How many times each key's operation ran.</summary>
    public ConcurrentDictionary<string, int> Runs { get; } = new();

    /// <summary>The result each worker ended with, per key: its own, or the one the key completed with.</summary>
    public ConcurrentDictionary<string, ConcurrentBag<string>> Results { get; } = new();

    /// <summary>Answers no worker of this README should get: a claim lost while running, outcome-unknown, anything else.</summary>
    public ConcurrentBag<string> Surprises { get; } = [];

    public ConcurrentDictionary<string, int> GaveUp { get; } = new();

    public long Requests => Interlocked.Read(ref requests);

    public long Unavailable => Interlocked.Read(ref unavailable);

    public long ConnectionErrors => Interlocked.Read(ref connectionErrors);

    public long AnswersLost => losing.Lost;

    public void Dispose()
    {
        Array.ForEach(clients, c => c.Dispose());
        losing.Dispose();
    }

    public static string Key(string prefix, int index) => prefix + index.ToString("D5", CultureInfo.InvariantCulture);

    /// <summary>Runs <paramref name="workersPerKey"/> concurrent workers on each of <paramref name="keys"/> keys.</summary>
    public Task RunAsync(string prefix, int keys, int workersPerKey, int keysInFlight, TimeSpan operation, TimeSpan deadline)
    {
        var until = DateTime.UtcNow + deadline;
        return Parallel.ForEachAsync(Enumerable.Range(0, keys), new ParallelOptions { MaxDegreeOfParallelism = keysInFlight }, async (index, _) =>
            await Task.WhenAll(Enumerable.Range(0, workersPerKey).Select(worker => WorkAsync(Key(prefix, index), index + worker, operation, until))));
    }

    /// <summary>Reads a key on one node until it answers: its status and, once completed, its result.</summary>
    public async Task<(string Status, string? Result)> ReadAsync(string key, int node)
    {
        for (var attempt = 0; ; attempt++)
        {
            var (status, body, _) = await SendAsync(HttpMethod.Get, key, "", null, node + attempt);
            if (status == HttpStatusCode.OK)
            {
                var state = body!.RootElement;
                return (state.GetProperty("status").GetString()!, state.TryGetProperty("result", out var result) ? result.GetString() : null);
            }

            Assert.True(attempt < 100, $"reading {key}: {(int)status}");
            await Task.Delay(200);
        }
    }

    private async Task WorkAsync(string key, int node, TimeSpan operation, DateTime deadline)
    {
        var attempt = Guid.NewGuid();
        while (DateTime.UtcNow < deadline)
        {
            var (status, body, retryAfter) = await SendAsync(HttpMethod.Post, key, "claim", new { input = "input-" + key, attempt }, node++);
            var state = body?.RootElement;
            switch (status)
            {
                case HttpStatusCode.Created:
                    Runs.AddOrUpdate(key, 1, (_, n) => n + 1);
                    await Task.Delay(operation);
                    var mine = $"{key} by {attempt}";
                    if (await CompleteAsync(key, state!.Value.GetProperty("token").GetString()!, mine, node, deadline))
                    {
                        Results.GetOrAdd(key, _ => []).Add(mine);
                    }

                    return;
                case HttpStatusCode.OK:
                    Results.GetOrAdd(key, _ => []).Add(state!.Value.GetProperty("result").GetString()!);
                    return;
                case HttpStatusCode.Conflict when Problem(state) == "request-in-progress":
                case HttpStatusCode.ServiceUnavailable:
                case 0:
                    await Task.Delay(retryAfter is { } delay ? TimeSpan.FromMilliseconds(Math.Min(delay.TotalMilliseconds, 500)) : TimeSpan.FromMilliseconds(200));
                    continue;
                default:
                    Surprises.Add($"{key} claim: {(int)status} {Problem(state)}");
                    return;
            }
        }

        GaveUp.AddOrUpdate(key, 1, (_, n) => n + 1);
    }

    // True once completed; false (a surprise) when the claim was no longer held.
    private async Task<bool> CompleteAsync(string key, string token, string result, int node, DateTime deadline)
    {
        while (DateTime.UtcNow < deadline)
        {
            var (status, body, _) = await SendAsync(HttpMethod.Post, key, "complete", new { token, result }, node++);
            switch (status)
            {
                case HttpStatusCode.OK:
                    return true;
                case HttpStatusCode.ServiceUnavailable:
                case 0:
                    await Task.Delay(200);
                    continue;
                default:
                    Surprises.Add($"{key} complete: {(int)status} {Problem(body?.RootElement)}");
                    return false;
            }
        }

        GaveUp.AddOrUpdate(key, 1, (_, n) => n + 1);
        return false;
    }

    // Status 0 stands for no answer at all (connection refused or reset, time-out).
    private async Task<(HttpStatusCode Status, JsonDocument? Body, TimeSpan? RetryAfter)> SendAsync(HttpMethod method, string key, string verb, object? body, int node)
    {
        Interlocked.Increment(ref requests);
        using var request = new HttpRequestMessage(method, $"/once/{key}" + (verb.Length > 0 ? "/" + verb : ""));
        if (body is not null)
        {
            request.Content = JsonContent.Create(body);
        }

        try
        {
            using var response = await clients[node % clients.Length].SendAsync(request);
            var bytes = await response.Content.ReadAsByteArrayAsync();
            if (response.StatusCode == HttpStatusCode.ServiceUnavailable)
            {
                Interlocked.Increment(ref unavailable);
            }

            return (response.StatusCode, bytes.Length > 0 ? JsonDocument.Parse(bytes) : null, response.Headers.RetryAfter?.Delta);
        }
        catch (Exception ex) when (ex is HttpRequestException or TaskCanceledException or IOException)
        {
            Interlocked.Increment(ref connectionErrors);
            return (0, null, null);
        }
    }

    private static string? Problem(JsonElement? state) =>
        state is { ValueKind: JsonValueKind.Object } s && s.TryGetProperty("type", out var type) ? type.GetString()?.Split('/')[^1] : null;

    private sealed class AnswerLosingHandler(int every) : DelegatingHandler(new SocketsHttpHandler())
    {
        private long sent;
        private long lost;

        public long Lost => Interlocked.Read(ref lost);

        protected override async Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken)
        {
            var response = await base.SendAsync(request, cancellationToken);
            if (request.Method == HttpMethod.Post && Interlocked.Increment(ref sent) % every == 0 && response.IsSuccessStatusCode)
            {
                response.Dispose();
                Interlocked.Increment(ref lost);
                throw new HttpRequestException("The answer was lost on its way back (injected).");
            }

            return response;
        }
    }
}
