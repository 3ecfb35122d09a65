using OrleansIdempotency.Testing;
using Xunit.Abstractions;
using System.Globalization;
using System.Text;

namespace OrleansIdempotency.Faults.Tests.Harness;

/// <summary>What happened, per key, set against what the clients saw.</summary>
public sealed record Verdict(
    string Scenario,
    long Requests,
    int Keys,
    long SideEffects,
    int Duplicates,
    int Disagreements,
    int Lost,
    int NotReplayed,
    int OutcomeUnknown,
    int GaveUp,
    long ServerErrors,
    long Unavailable)
{
    public override string ToString() => string.Create(CultureInfo.InvariantCulture,
        $"{Scenario}: requests={Requests} keys={Keys} side-effects={SideEffects} duplicates={Duplicates} disagreeing={Disagreements} " +
        $"lost={Lost} not-replayed={NotReplayed} outcome-unknown={OutcomeUnknown} gave-up={GaveUp} 5xx={ServerErrors} (503={Unavailable})");
}

/// <summary>Compares the clients' replies with the side effects in PostgreSQL, and asks every completed key again.</summary>
public static class Checker
{
    public static async Task<Verdict> CheckAsync(string scenario, FaultCluster cluster, Workload workload, WorkloadOptions options, bool replayCheck = true)
    {
        var sideEffects = await cluster.SideEffectsAsync(options.Path == "/payments" ? "demo_payments" : "demo_orders", options.KeyPrefix);
        int duplicates = 0, disagreements = 0, lost = 0, notReplayed = 0, unknown = 0;
        for (var index = 0; index < options.Keys; index++)
        {
            var key = Workload.Key(options, index);
            var effects = sideEffects.GetValueOrDefault(key);
            var replies = workload.Replies.TryGetValue(key, out var bag) ? bag.ToArray() : [];
            var created = replies.Where(r => r.Status is >= 200 and < 300).ToArray();
            duplicates += effects > 1 ? 1 : 0;
            disagreements += created.Select(r => Convert.ToBase64String(r.Body)).Distinct().Count() > 1 ? 1 : 0;
            lost += created.Length > 0 && effects == 0 ? 1 : 0;
            unknown += replies.Any(r => r.ProblemType?.EndsWith("/outcome-unknown", StringComparison.Ordinal) == true) ? 1 : 0;
            if (replayCheck && created.Length > 0)
            {
                var again = await workload.SendUntilAnsweredAsync(options, key, index, DateTime.UtcNow + TimeSpan.FromSeconds(30), 0);
                notReplayed += again is null || !again.Replayed || !again.Body.AsSpan().SequenceEqual(created[0].Body) ? 1 : 0;
            }
        }

        return new Verdict(scenario, workload.Stats.Requests, options.Keys, sideEffects.Values.Sum(), duplicates, disagreements, lost,
            notReplayed, unknown, workload.GaveUp.Count, workload.Stats.ServerErrors, workload.Stats.Unavailable);
    }
}

/// <summary>Prints a scenario's counts to the test output and appends them to the run's fault report.</summary>
public static class FaultReport
{
    public static void Write(ITestOutputHelper output, object line)
    {
        var text = line.ToString()!;
        output.WriteLine(text);
        Console.WriteLine(text);
        if (Environment.GetEnvironmentVariable("IDEMPOTENCY_TEST_RUN_DIR") is { Length: > 0 } directory)
        {
            File.AppendAllText(Path.Combine(directory, "fault-report.txt"), text + Environment.NewLine, new UTF8Encoding(encoderShouldEmitUTF8Identifier: false));
        }
    }
}
