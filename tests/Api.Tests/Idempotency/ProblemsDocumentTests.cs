using System.Reflection;
using OrleansIdempotency.Testing;

namespace OrleansIdempotency.AspNetCore.Tests;

/// <summary>docs/problems.md, which clients read to decide what to do, says what the layer answers.</summary>
public sealed class ProblemsDocumentTests
{
    // Kestrel's statuses for a body it refuses: malformed, too slow, too large.
    private static readonly int[] UnreadableBodyStatuses = [400, 408, 413];

    [Fact]
    public void EveryProblemTheLayerAnswers_HasItsRow_WithItsStatusAndWhetherItIsRetryable_AndNoRowIsStale()
    {
        var rows = File.ReadAllLines(Path.Combine(Binaries.Root, "docs", "problems.md"))
            .Where(line => line.StartsWith("| ", StringComparison.Ordinal) && line.Contains('`', StringComparison.Ordinal))
            .Select(line => line.Split('|', StringSplitOptions.TrimEntries))
            .ToDictionary(cells => cells[1].Split('`')[1], cells => (Status: cells[2], Retryable: cells[3]));
        var problems = typeof(IdempotencyProblem).GetFields(BindingFlags.Public | BindingFlags.Static)
            .Where(field => field.FieldType == typeof(IdempotencyProblem))
            .Select(field => (IdempotencyProblem)field.GetValue(null)!)
            .Concat(UnreadableBodyStatuses.Select(IdempotencyProblem.BodyUnreadable))
            .ToList();

        Assert.All(problems, problem =>
        {
            Assert.True(rows.TryGetValue(problem.Name, out var row), $"{problem.Name} has no row.");
            Assert.Contains(problem.Status.ToString(System.Globalization.CultureInfo.InvariantCulture), row.Status, StringComparison.Ordinal);
            var documented = row.Retryable switch
            {
                "yes" => true,
                "no" => false,
                "408 only" => problem.Status == 408,
                var other => throw new InvalidOperationException($"{problem.Name}: retryable '{other}'?"),
            };
            Assert.True(documented == problem.Retryable, $"{problem.Name} ({problem.Status}) is documented retryable '{row.Retryable}', answered {problem.Retryable}.");
        });
        Assert.Equal(rows.Keys.Order(), problems.Select(p => p.Name).Distinct().Order());
    }
}
